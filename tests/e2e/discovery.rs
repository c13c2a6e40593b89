//! Service discovery and VIPs as Swarm users expect them (issue 19), on the
//! routed lab of `routed.rs` (a node on each side of a router, managed).
//!
//! Service `web` (no `--vip-port`: its VIP carries every port) has a task
//! on each node, each serving HTTP on ports 80 and 5432 (`tool
//! http-name`). From a client task of another service: both ports through
//! the VIP, answered by both tasks; ping to the VIP. From web's own task
//! on node 1: 100 calls to its own service's VIP all answered (hairpin:
//! about half are balanced to itself).

use crate::lab::wait_for as wait;
use crate::lab::{BIN, Lab, in_ns, in_ns_ok, ip, wait_for};
use crate::routed::{RNode, boot, cli_ok, fabric, init_and_join, router};

/// The router's legs: node 1's side, node 2's, the outside's.
const LEGS: [(&str, &str, &str, &str); 3] = [
    ("brA", "ra1", "02:00:00:00:0a:fe", "198.18.10.254"),
    ("brB", "rb", "02:00:00:00:14:fe", "198.18.20.254"),
    ("brC", "rc", "02:00:00:00:1e:fe", "198.18.30.254"),
];
use crate::{Io, need_root, serial};
use std::collections::BTreeMap;

/// The routed lab, managed, with `web`'s two tasks serving and a client
/// task; returns the lab, the nodes, the task namespaces (web.1, web.2,
/// client) and the fabric's.
fn lab(io: Io, tag: &str) -> (Lab, RNode, RNode, [String; 3], String) {
    let mut lab = Lab::new(&format!("{tag}-{}", io.arg()));
    let fab = fabric(&mut lab, &["brA", "brB", "br1"]);
    router(&mut lab, &fab, &LEGS[..2]);
    // Node 1's second address for the routing mesh: with TAP a flag; with
    // AF_XDP an address of the data NIC (added below).
    let extra: &[&str] = if io == Io::Tap { &["--mesh-addr", SECOND] } else { &[] };
    let n1 = crate::routed::boot_with(&mut lab, io, &fab, (1, "brA", 10, 20), extra);
    let n2 = boot(&mut lab, io, &fab, 2, "brB", 20, 10);
    init_and_join(&n1, &n2);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "web", "--network", "app", "--target-port", "80"]);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "client", "--network", "app", "--target-port", "80"]);
    let t = [lab.ns("w1"), lab.ns("w2"), lab.ns("c1")];
    for (tns, svc, node, id) in
        [(&t[0], "web", "node1", "web.1"), (&t[1], "web", "node2", "web.2"), (&t[2], "client", "node1", "client.1")]
    {
        cli_ok(&n1.state, &["task", "attach", "--service", svc, "--node", node, "--netns", tns, "--id", id]);
    }
    for tns in &t {
        wait_for(&format!("the task port in {tns}"), 20, || {
            String::from_utf8_lossy(&in_ns(tns, &["ip", "-4", "route", "show", "default"]).stdout).contains("via")
        });
    }
    for (tns, name) in [(&t[0], "web.1"), (&t[1], "web.2")] {
        for port in [80, 5432] {
            let listen = format!("0.0.0.0:{port}");
            let p = lab.spawn(
                tns,
                &format!("{name}-{port}"),
                &[BIN, "tool", "http-name", "--listen", &listen, "--name", name],
            );
            wait_for(&format!("{name} on {port}"), 10, || {
                assert!(lab.running(p), "{}", lab.log(p));
                String::from_utf8_lossy(&in_ns(tns, &["ss", "-ltn"]).stdout).contains(&format!(":{port} "))
            });
        }
    }
    (lab, n1, n2, t, fab)
}

/// Node 1's second address (the routing mesh answers on it too).
const SECOND: &str = "198.18.10.21";

/// A service's VIP and port from the state (`service ls`).
fn vip(n: &RNode, svc: &str) -> (String, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(&n.state, &["service", "ls", "--format", "json"])).expect("json");
    let a = &v[svc]["vip"];
    (a[0].as_str().unwrap_or_default().to_owned(), a[1].as_u64().unwrap_or(99))
}

/// Who answered `n` fetches of `url` from `tns` (`tool http-name` says
/// "NAME saw ADDR:PORT"); every fetch must succeed.
fn answers(tns: &str, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for i in 0..n {
        let o = in_ns(tns, &["curl", "-sf", "--max-time", "3", url]);
        let body = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "fetch {i} of {url} from {tns} failed: {}", String::from_utf8_lossy(&o.stderr));
        let who = body.split_whitespace().next().unwrap_or_default().to_owned();
        *by.entry(who).or_default() += 1;
    }
    by
}

fn vips(io: Io) {
    let _g = serial();
    let (mut lab, n1, n2, t, fab) = lab(io, "vip");
    let (vip, port) = vip(&n1, "web");
    assert_eq!(port, 0, "no --vip-port: every port");
    let ls = cli_ok(&n1.state, &["service", "ls"]);
    assert!(ls.contains(&format!("{vip}:*")), "{ls}");
    // Both ports through the VIP, untranslated, answered by both tasks.
    for p in [80, 5432] {
        let url = format!("http://{vip}:{p}/");
        wait_for(&format!("a first answer from {url}"), 15, || {
            in_ns(&t[2], &["curl", "-sf", "--max-time", "2", &url]).status.success()
        });
        let by = answers(&t[2], &url, 20);
        eprintln!("{}: {url} from the client: {by:?}", io.arg());
        assert!(by.len() == 2 && by.contains_key("web.1") && by.contains_key("web.2"), "{by:?}");
    }
    // Ping to the VIP is answered.
    in_ns_ok(&t[2], &["ping", "-c", "2", "-i", "0.2", "-W", "2", &vip]);
    // Hairpin: web.1 calls its own service's VIP 100 times.
    let by = answers(&t[0], &format!("http://{vip}/"), 100);
    eprintln!("{}: web.1 → its own VIP: {by:?}", io.arg());
    assert_eq!(by.values().sum::<usize>(), 100);
    assert!(by.get("web.1").copied().unwrap_or(0) > 0, "never balanced to itself: {by:?}");
    let w: serde_json::Value =
        serde_json::from_str(&cli_ok(&n1.state, &["stats", "--format", "json"])).expect("stats json");
    let hairpins = w["dataplane"]["workers"][0]["egress"]["hairpin_conns"].as_u64().unwrap_or(0);
    assert!(hairpins > 0, "{}", w["dataplane"]["workers"][0]["egress"]);

    // A task reaches a published port: its own node's (the routing mesh
    // with the task as its client) and another node's (through egress).
    cli_ok(&n1.state, &["service", "update", "--publish-add", "30400:80", "web"]);
    for url in ["http://198.18.10.1:30400/", "http://198.18.20.2:30400/"] {
        wait(&format!("{url} from the client task"), 15, || {
            in_ns(&t[2], &["curl", "-sf", "--max-time", "2", url]).status.success()
        });
        let by = answers(&t[2], url, 10);
        eprintln!("{}: {url} from the client task: {by:?}", io.arg());
        assert_eq!(by.values().sum::<usize>(), 10);
    }

    // A process on a node reaches a published port at 127.0.0.1 and at
    // the node's own address (the node's nftables, the host link).
    for (n, addr) in [(&n1, "198.18.10.1"), (&n2, "198.18.20.2")] {
        for url in ["http://127.0.0.1:30400/".to_owned(), format!("http://{addr}:30400/")] {
            wait(&format!("{url} from {}", n.ns), 15, || {
                in_ns(&n.ns, &["curl", "-sf", "--max-time", "2", &url]).status.success()
            });
            let by = answers(&n.ns, &url, 6);
            eprintln!("{}: {url} from {}: {by:?}", io.arg(), n.ns);
        }
    }

    // Host mode: service hm's port 30300 opens only on node 1, which runs
    // its task, and its task sees the client's own address.
    let cl = lab.ns("cl");
    crate::routed::leg(&fab, "brA", "cl0", &cl, "cl0", "02:00:00:00:0a:64", "198.18.10.100");
    ip(&format!("-n {cl} route add default via 198.18.10.254"));
    // Checksums complete on the wire, as a real client's are (a veth
    // leaves them partial, and an AF_XDP uplink cannot tell).
    in_ns_ok(&cl, &["ethtool", "-K", "cl0", "tx", "off"]);
    #[rustfmt::skip]
    cli_ok(&n1.state, &["service", "create", "--name", "hm", "--network", "app", "--publish", "mode=host,30300:80"]);
    let h1 = lab.ns("h1");
    cli_ok(&n1.state, &["task", "attach", "--service", "hm", "--node", "node1", "--netns", &h1, "--id", "hm.1"]);
    wait_for("hm.1's port", 20, || {
        String::from_utf8_lossy(&in_ns(&h1, &["ip", "-4", "route", "show", "default"]).stdout).contains("via")
    });
    let p = lab.spawn(&h1, "hm.1", &[BIN, "tool", "http-name", "--listen", "0.0.0.0:80", "--name", "hm.1"]);
    wait_for("hm.1 on 80", 10, || {
        assert!(lab.running(p), "{}", lab.log(p));
        String::from_utf8_lossy(&in_ns(&h1, &["ss", "-ltn"]).stdout).contains(":80 ")
    });
    let ls = cli_ok(&n1.state, &["task", "ls", "--service", "hm"]);
    assert!(ls.contains("198.18.10.1:30300->80"), "{ls}");
    // Every address: node 1's second one serves the routing mesh, answered
    // from it (with AF_XDP an address added to the data NIC, taken at the
    // next publication: the service created above made one).
    if io == Io::Afxdp {
        ip(&format!("-n {} addr add {SECOND}/24 dev up0", n1.ns));
        cli_ok(&n1.state, &["service", "update", "--scheduler", "rr", "web"]);
    }
    let url2 = format!("http://{SECOND}:30400/");
    wait_for("the second address", 15, || in_ns(&cl, &["curl", "-sf", "--max-time", "2", &url2]).status.success());
    let by = answers(&cl, &url2, 6);
    eprintln!("{}: {url2} from the underlay client: {by:?}", io.arg());
    let url = "http://198.18.10.1:30300/";
    wait_for("host mode on node 1", 15, || in_ns(&cl, &["curl", "-sf", "--max-time", "2", url]).status.success());
    let body = in_ns_ok(&cl, &["curl", "-sf", "--max-time", "3", url]);
    assert!(body.starts_with("hm.1 saw 198.18.10.100:"), "the client's address is kept: {body}");
    let o = in_ns(&cl, &["curl", "-sf", "--max-time", "3", "http://198.18.20.2:30300/"]);
    assert!(!o.status.success(), "node 2 runs no task of hm but answered: {}", String::from_utf8_lossy(&o.stdout));
    for n in [&n1, &n2] {
        assert!(lab.stop(n.proc_), "{} did not stop cleanly:\n{}", n.ns, lab.log(n.proc_));
        // Its nftables table went with it.
        let tables = in_ns_ok(&n.ns, &["nft", "list", "tables"]);
        assert!(!tables.contains("meshplane-local"), "{}: {tables}", n.ns);
    }
}

both_backends!(vips: vips_afxdp, vips_tap);

/// The outside resolver's address (dnsmasq in namespace `out`).
const RESOLVER: &str = "198.18.30.10";

/// `dig` from `tns` (its resolv.conf: the gateway): the `+short` lines.
fn dig(tns: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec!["dig", "+short", "+time=2", "+tries=2"];
    a.extend_from_slice(args);
    let o = in_ns_ok(tns, &a);
    o.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect()
}

/// The status `dig` reports (NOERROR, NXDOMAIN, SERVFAIL, …).
fn dig_status(tns: &str, name: &str) -> String {
    let o = in_ns(tns, &["dig", "+time=6", "+tries=1", name]);
    let out = String::from_utf8_lossy(&o.stdout);
    out.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("none").to_owned()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn names(io: Io) {
    let _g = serial();
    let mut lab = Lab::new(&format!("dns-{}", io.arg()));
    let fab = fabric(&mut lab, &["brA", "brB", "brC", "br1"]);
    router(&mut lab, &fab, &LEGS);
    // The outside resolver: dnsmasq answering outside.test.
    let out = lab.ns("out");
    crate::routed::leg(&fab, "brC", "o0", &out, "o0", "02:00:00:00:1e:0a", RESOLVER);
    ip(&format!("-n {out} route add default via 198.18.30.254"));
    in_ns_ok(&out, &["ethtool", "-K", "o0", "tx", "off"]);
    let pid = lab.dir.join("dnsmasq.pid");
    #[rustfmt::skip]
    let dnsmasq = lab.spawn(&out, "dnsmasq", &["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--bind-interfaces", &format!("--listen-address={RESOLVER}"), "--user=root",
        &format!("--pid-file={}", pid.display()), "--address=/outside.test/198.18.30.10"]);
    wait_for("dnsmasq", 10, || {
        assert!(lab.running(dnsmasq), "{}", lab.log(dnsmasq));
        String::from_utf8_lossy(&in_ns(&out, &["ss", "-lun"]).stdout).contains(&format!("{RESOLVER}:53"))
    });
    let up = ["--dns-upstream", RESOLVER];
    let n1 = crate::routed::boot_with(&mut lab, io, &fab, (1, "brA", 10, 20), &up);
    let n2 = crate::routed::boot_with(&mut lab, io, &fab, (2, "brB", 20, 10), &up);
    for (n, side) in [(&n1, 10), (&n2, 20)] {
        ip(&format!("-n {} route add default via 198.18.{side}.254", n.ns));
    }
    init_and_join(&n1, &n2);
    cli_ok(&n1.state, &["network", "create", "--subnet", "198.19.9.0/24", "--internal", "vault"]);
    for args in [
        &["--name", "web", "--network", "app", "--target-port", "80"][..],
        &["--name", "db", "--network", "app", "--target-port", "5432", "--endpoint-mode", "dnsrr"],
        &["--name", "client", "--network", "app", "--target-port", "80"],
        &["--name", "safe", "--network", "vault", "--target-port", "80"],
    ] {
        cli_ok(&n1.state, &[&["service", "create"][..], args].concat());
    }
    let mut ns = BTreeMap::new();
    let mut attached = BTreeMap::new();
    for (id, node) in [
        ("web.1", "node1"),
        ("web.2", "node2"),
        ("web.3", "node2"),
        ("db.1", "node1"),
        ("db.2", "node2"),
        ("client.1", "node1"),
        ("safe.1", "node1"),
    ] {
        let tns = lab.ns(&id.replace('.', ""));
        let svc = id.split('.').next().unwrap_or_default();
        let o = cli_ok(&n1.state, &["task", "attach", "--service", svc, "--node", node, "--netns", &tns, "--id", id]);
        attached.insert(id, o);
        ns.insert(id, tns);
    }
    for tns in ns.values() {
        wait_for(&format!("the task port in {tns}"), 20, || {
            String::from_utf8_lossy(&in_ns(tns, &["ip", "-4", "route", "show", "default"]).stdout).contains("via")
        });
    }
    for id in ["web.1", "web.2", "web.3"] {
        let p = lab.spawn(&ns[id], id, &[BIN, "tool", "http-name", "--listen", "0.0.0.0:80", "--name", id]);
        wait_for(&format!("{id} on 80"), 10, || {
            assert!(lab.running(p), "{}", lab.log(p));
            String::from_utf8_lossy(&in_ns(&ns[id], &["ss", "-ltn"]).stdout).contains(":80 ")
        });
    }
    let tasks: serde_json::Value =
        serde_json::from_str(&cli_ok(&n1.state, &["task", "ls", "--format", "json"])).expect("json");
    let addr = |id: &str| crate::lab::task_ip(&tasks, id);
    let (web_vip, _) = vip(&n1, "web");
    let (safe_vip, _) = vip(&n1, "safe");
    let c = &ns["client.1"];

    // What the attacher was told, and what the namespace sees.
    assert!(attached["client.1"].contains("DNS 198.19.0.254"), "{}", attached["client.1"]);
    let rc = std::fs::read_to_string(format!("/etc/netns/{c}/resolv.conf")).expect("resolv.conf");
    assert!(rc.contains("nameserver 198.19.0.254") && rc.contains("ndots:0"), "{rc}");

    // Cluster names, from the client on node 1.
    wait_for("the first answer", 15, || in_ns(c, &["dig", "+short", "+time=1", "+tries=1", "web"]).status.success());
    assert_eq!(dig(c, &["web"]), [web_vip.as_str()]);
    assert_eq!(dig(c, &["web.app"]), [web_vip.as_str()]);
    assert_eq!(sorted(dig(c, &["tasks.web"])), sorted(vec![addr("web.1"), addr("web.2"), addr("web.3")]));
    assert_eq!(sorted(dig(c, &["+tcp", "tasks.web"])), sorted(vec![addr("web.1"), addr("web.2"), addr("web.3")]));
    assert_eq!(dig(c, &["web.2"]), [addr("web.2")]);
    assert_eq!(sorted(dig(c, &["db"])), sorted(vec![addr("db.1"), addr("db.2")]));
    let firsts: std::collections::BTreeSet<String> =
        (0..20).filter_map(|_| dig(c, &["db"]).into_iter().next()).collect();
    assert_eq!(firsts.len(), 2, "dnsrr answers are shuffled: {firsts:?}");
    assert_eq!(dig(c, &["-x", &web_vip]), ["web.app."]);
    assert_eq!(dig(c, &["-x", &addr("web.2")]), ["web.2.app."]);
    // SRV: a record per serving task on its port, its address additional.
    let srv = sorted(dig(c, &["SRV", "_80._tcp.web"]));
    assert_eq!(srv, ["0 1 80 web.1.app.", "0 1 80 web.2.app.", "0 1 80 web.3.app."]);
    let add = in_ns_ok(c, &["dig", "+noall", "+additional", "+time=2", "SRV", "_80._tcp.web.app"]);
    for id in ["web.1", "web.2", "web.3"] {
        assert!(add.contains(&format!("{id}.app.")) && add.contains(&addr(id)), "{add}");
    }
    let full = in_ns_ok(c, &["dig", "+noall", "+answer", "+time=2", "web"]);
    assert!(full.split_whitespace().nth(1) == Some("600"), "TTL 600: {full}");
    // The resolver of libc, and a client by name.
    let g = in_ns_ok(c, &["getent", "hosts", "web"]);
    assert!(g.starts_with(&format!("{web_vip} ")), "{g}");
    let body = in_ns_ok(c, &["curl", "-sf", "--max-time", "5", "http://web/"]);
    assert!(body.starts_with("web."), "{body}");
    // From node 2 too.
    assert_eq!(dig(&ns["web.2"], &["web"]), [web_vip.as_str()]);

    // Outside names: forwarded to the node's upstream; never from an
    // internal network, whose own names still answer.
    assert_eq!(dig(c, &["outside.test"]), [RESOLVER]);
    let s = &ns["safe.1"];
    assert_eq!(dig(s, &["safe"]), [safe_vip]);
    assert_eq!(dig_status(s, "outside.test"), "SERVFAIL");
    // Another network's names do not exist for a task.
    assert_eq!(dig_status(s, "web"), "SERVFAIL", "an internal network forwards nothing, not even unknown names");

    // Malformed queries get FORMERR, and the server keeps answering.
    for (what, hex) in [
        ("truncated", "1234 0100 0001 0000 0000 0000 0377 65"),
        ("pointer loop", "1234 0100 0001 0000 0000 0000 c00c 0001 0001"),
        ("no question", "1234 0100 0000 0000 0000 0000"),
        ("65535 questions", "1234 0100 ffff 0000 0000 0000 0377 6562 0000 0100 01"),
        ("65535 additional", "1234 0100 0001 0000 0000 ffff 0377 6562 0000 0100 01"),
    ] {
        let o = in_ns_ok(c, &[BIN, "tool", "dns-raw", "--server", "198.19.0.254:53", "--hex", hex]);
        assert!(o.contains("rcode=FORMERR"), "{what}: {o}");
    }
    assert_eq!(dig(c, &["web"]), [web_vip.as_str()]);

    // dnsperf: up to 20 000 queries/s of cluster names for 10 s, none
    // lost. (The rate reached depends on the machine's load: the figure
    // is scripts/bench's `dns` row; here, every query sent is answered,
    // and at a rate no trickle reaches.)
    let names = lab.dir.join("names.txt");
    std::fs::write(&names, "web A\ntasks.web A\nweb.1 A\ndb A\n_80._tcp.web SRV\n").expect("names");
    #[rustfmt::skip]
    let perf = in_ns_ok(c, &["dnsperf", "-s", "198.19.0.254", "-d", names.to_str().unwrap_or_default(),
        "-Q", "20000", "-l", "10", "-c", "4", "-q", "500", "-t", "2"]);
    eprintln!("{}: dnsperf:\n{perf}", io.arg());
    let field = |k: &str| {
        perf.lines()
            .find(|l| l.trim_start().starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(field("Queries lost"), 0.0, "{perf}");
    assert_eq!(field("Queries completed"), field("Queries sent"), "{perf}");
    assert!(field("Queries completed") >= 50_000.0, "{perf}");

    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&n1.state, &["stats", "--format", "json"])).expect("stats json");
    eprintln!("{}: node1 dns {}", io.arg(), st["dataplane"]["dns"]);
    assert!(lab.stop(dnsmasq));
    for n in [&n1, &n2] {
        assert!(lab.stop(n.proc_), "{} did not stop cleanly:\n{}", n.ns, lab.log(n.proc_));
    }
    assert!(!std::path::Path::new(&format!("/etc/netns/{c}/resolv.conf")).exists(), "resolv.conf left behind");
}

both_backends!(names: dns_afxdp, dns_tap);
