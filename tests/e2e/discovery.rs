//! Service discovery and VIPs as Swarm users expect them (issue 19), on the
//! routed lab of `routed.rs` (a node on each side of a router, managed).
//!
//! Service `web` (no `--vip-port`: its VIP carries every port) has a task
//! on each node, each serving HTTP on ports 80 and 5432 (`tool
//! http-name`). From a client task of another service: both ports through
//! the VIP, answered by both tasks; ping to the VIP. From web's own task
//! on node 1: 100 calls to its own service's VIP all answered (hairpin:
//! about half are balanced to itself).

use crate::lab::{BIN, Lab, in_ns, in_ns_ok, ip, wait_for};
use crate::routed::{RNode, boot, cli_ok, init_and_join};
use crate::{Io, need_root, serial};
use std::collections::BTreeMap;

/// The routed lab, managed, with `web`'s two tasks serving and a client
/// task; returns the lab, the nodes, the task namespaces (web.1, web.2,
/// client) and the fabric's.
fn lab(io: Io, tag: &str) -> (Lab, RNode, RNode, [String; 3], String) {
    let mut lab = Lab::new(&format!("{tag}-{}", io.arg()));
    let fab = lab.ns("fab");
    for br in ["brA", "brB", "br1"] {
        ip(&format!("-n {fab} link add {br} type bridge"));
        ip(&format!("-n {fab} link set {br} up"));
    }
    for f in ["iptables", "ip6tables", "arptables"] {
        let _ = in_ns(&fab, &["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{f}=0")]);
    }
    let rt = lab.ns("rt");
    in_ns_ok(&rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    crate::routed::leg(&fab, "brA", "ra1", &rt, "ra1", "02:00:00:00:0a:fe", "198.18.10.254");
    crate::routed::leg(&fab, "brB", "rb", &rt, "rb", "02:00:00:00:14:fe", "198.18.20.254");
    let n1 = boot(&mut lab, io, &fab, 1, "brA", 10, 20);
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
    let url = "http://198.18.10.1:30300/";
    wait_for("host mode on node 1", 15, || in_ns(&cl, &["curl", "-sf", "--max-time", "2", url]).status.success());
    let body = in_ns_ok(&cl, &["curl", "-sf", "--max-time", "3", url]);
    assert!(body.starts_with("hm.1 saw 198.18.10.100:"), "the client's address is kept: {body}");
    let o = in_ns(&cl, &["curl", "-sf", "--max-time", "3", "http://198.18.20.2:30300/"]);
    assert!(!o.status.success(), "node 2 runs no task of hm but answered: {}", String::from_utf8_lossy(&o.stdout));
    for n in [&n1, &n2] {
        assert!(lab.stop(n.proc_), "{} did not stop cleanly:\n{}", n.ns, lab.log(n.proc_));
    }
}

both_backends!(vips: vips_afxdp, vips_tap);
