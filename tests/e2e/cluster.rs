//! The control plane and the CLI end to end, on the lab (`meshplane lab
//! up`: three nodes running their control planes in namespaces, the
//! cluster built with the CLI: init, join, network create, service create,
//! task attach --netns): requests through the published port reach every
//! task; a node killed → its task leaves the other nodes' balancers within
//! seconds and comes back when the node restarts from disk; the Raft leader
//! killed → writes go on through another manager, and the old leader
//! catches up; drain (no new connections to the task), detach (its port is
//! removed), service rm (connections refused at once); bad CLI input gets a
//! clear error and a non-zero exit.

use crate::lab::{BIN, run, task_ip};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `service create` of a `dnsrr` service with a published port: refused.
const DNSRR_PUBLISHED: [&str; 10] =
    ["service", "create", "--name", "db", "--network", "app", "--endpoint-mode", "dnsrr", "--publish", "30095:5432"];
/// `service create` of a `dnsrr` service with a VIP port: refused.
const DNSRR_VIP: [&str; 12] = [
    "service",
    "create",
    "--name",
    "db",
    "--network",
    "app",
    "--endpoint-mode",
    "dnsrr",
    "--vip-port",
    "5432",
    "--target-port",
    "5432",
];

/// The lab, taken down when dropped (also when the test fails).
pub(crate) struct LabGuard(pub(crate) PathBuf);

impl LabGuard {
    pub(crate) fn lab(&self, args: &[&str]) -> Output {
        let mut v = vec!["lab"];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--dir", self.0.to_str().expect("utf-8")]);
        Command::new(BIN).args(&v).output().expect("running meshplane lab")
    }
    /// The CLI against node `n`'s admin socket.
    pub(crate) fn cli(&self, n: u8, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(self.0.join(format!("node{n}")))
            .output()
            .expect("running meshplane")
    }
    pub(crate) fn cli_ok(&self, n: u8, args: &[&str]) -> String {
        let o = self.cli(n, args);
        assert!(o.status.success(), "meshplane {args:?} on node{n}: {}{}", text(&o.stdout), text(&o.stderr));
        text(&o.stdout)
    }
    /// Backend addresses of service `web` in node `n`'s tables.
    pub(crate) fn backends(&self, n: u8) -> Vec<String> {
        let o = self.cli(n, &["lb", "ls", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["tables"]["service"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "web")
            .flat_map(|s| s["backend"].as_array().cloned().unwrap_or_default())
            .filter(|b| b["weight"].as_u64() != Some(0))
            .filter_map(|b| b["ip"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if std::env::var_os("MESHPLANE_E2E_KEEP").is_none() {
            let _ = self.lab(&["down"]);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Node `n`'s descriptor limit lowered to what it holds plus a few,
/// connections to its admin socket held open until its accepts fail and
/// then let go, the limit put back: the CLI is answered again at once.
fn admin_socket_outlives_running_out_of_descriptors(g: &LabGuard, n: u8) {
    let pids = std::fs::read_to_string(g.0.join("pids")).expect("the lab's pid list");
    let log = format!("node{n}.log");
    let pid = pids
        .lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some(log.as_str()))
        .and_then(|l| l.split_whitespace().next())
        .expect("node's pid")
        .to_owned();
    let open = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let (soft, hard) = (line.split_whitespace().nth(3).expect("soft"), line.split_whitespace().nth(4).expect("hard"));
    // The node raised its soft limit to the hard one (at most 2^20).
    let hard_n: u64 = hard.parse().unwrap_or(u64::MAX);
    assert_eq!(soft.parse::<u64>().ok(), Some(hard_n.min(1 << 20)), "{line}");
    let soft = soft.to_owned();
    let set_soft = |v: &str| {
        let o = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={v}:")]).output().expect("prlimit");
        assert!(o.status.success(), "prlimit: {}", text(&o.stderr));
    };
    let cap = open() + 8;
    set_soft(&cap.to_string());
    let socket = g.0.join(format!("node{n}")).join("admin.sock");
    let held: Vec<_> = (0..32).filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok()).collect();
    assert!(held.len() >= 8, "only {} connections", held.len());
    wait("node's descriptors at its limit", 5, || open() >= cap);
    // Accepts fail for a while (retried every 50 ms).
    std::thread::sleep(Duration::from_millis(500));
    drop(held);
    set_soft(&soft);
    wait("the admin socket answering again", 5, || g.cli(n, &["node", "ls"]).status.success());
    let log = std::fs::read_to_string(g.0.join(&log)).unwrap_or_default();
    assert!(log.contains("admin socket: accept failed"), "no accept failed: the limit was not reached?");
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One HTTP request from the client to `node`'s published `port`: the
/// task's answer ("web.2 saw 198.19.0.3:40000"), or the error.
pub(crate) fn get(node: u8, port: u16) -> Result<String, String> {
    let url = format!("http://198.18.0.{node}:{port}/");
    let o = Command::new("ip")
        .args(["netns", "exec", "mp-lab-c", BIN, "tool", "http-get", "--url", &url, "--timeout", "3"])
        .output()
        .expect("running http-get");
    if o.status.success() { Ok(text(&o.stdout).trim().to_owned()) } else { Err(text(&o.stderr)) }
}

/// Who answered `n` requests through `node`:30080 (all must be answered).
pub(crate) fn answered(node: u8, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| {
            let body = get(node, 30080).unwrap_or_else(|e| panic!("a request through node{node} failed: {e}"));
            body.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect()
}

pub(crate) fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

pub(crate) fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

pub(crate) fn cluster_on_the_lab(io: &str) {
    let dir = std::env::temp_dir().join(format!("meshplane-e2e-cluster-{}-{io}", std::process::id()));
    let g = LabGuard(dir);
    let _ = g.lab(&["down"]);
    let up = g.lab(&["up", "--io", io]);
    assert!(up.status.success(), "lab up: {}{}", text(&up.stdout), text(&up.stderr));
    let tasks: serde_json::Value =
        serde_json::from_str(&g.cli_ok(1, &["task", "ls", "--format", "json"])).expect("task ls json");
    let ip_of = |id: &str| task_ip(&tasks, id);
    let (ip1, ip3) = (ip_of("web.1"), ip_of("web.3"));
    let has = |n: u8, ips: &[&String]| {
        let mut b = g.backends(n);
        b.sort();
        let mut want: Vec<String> = ips.iter().map(|s| (*s).clone()).collect();
        want.sort();
        b == want
    };

    // Every task answers through every node.
    for n in 1..=3 {
        assert_eq!(answered(n, 16), set(&["web.1", "web.2", "web.3"]), "through node{n}");
    }
    let nodes = g.cli_ok(1, &["node", "ls"]);
    assert!(nodes.contains("leader") && nodes.matches("ready").count() == 3, "{nodes}");
    // Prometheus metrics on the management address: the balanced
    // connections and the nodes' liveness.
    let m = Command::new("ip")
        .args(["netns", "exec", "mp-lab-n1", BIN, "tool", "http-get", "--url", "http://198.18.1.1:9323/metrics"])
        .output()
        .expect("http-get");
    let m = text(&m.stdout);
    assert!(m.contains("# TYPE meshplane_service_new_connections_total counter"), "{m}");
    assert!(
        m.lines().any(|l| l.starts_with("meshplane_service_new_connections_total{worker=\"0\",service=\"web\"} ")
            && !l.ends_with(" 0")),
        "{m}"
    );
    assert!(m.contains("meshplane_node_up{node=\"node3\"} 1"), "{m}");
    // promtool (Debian's `prometheus` package) accepts the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool (scripts/bootstrap installs it)");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), m.as_bytes()).expect("writing to promtool");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{m}",
        text(&checked.stdout),
        text(&checked.stderr)
    );

    // The connections node1 tracks: both directions of the ones it balanced.
    let ct: serde_json::Value =
        serde_json::from_str(&g.cli_ok(1, &["conntrack", "ls", "--service", "web", "--format", "json"])).expect("json");
    let ct = ct.as_array().expect("a list");
    assert!(ct.iter().any(|e| e["direction"] == "forward" && e["dst"] == "198.18.0.1:30080"), "{ct:?}");
    assert!(ct.iter().any(|e| e["direction"] == "reply"), "{ct:?}");

    // A port published by an update works at once on every node; withdrawn,
    // it is refused.
    g.cli_ok(2, &["service", "update", "--publish-add", "mode=preserve-source,30090:8080", "web"]);
    wait("port 30090 on node3", 10, || get(3, 30090).is_ok_and(|b| b.contains("saw 198.18.0.100:")));
    g.cli_ok(2, &["service", "update", "--publish-rm", "30090", "web"]);
    wait("port 30090 refused on node3", 10, || get(3, 30090).is_err_and(|e| e.contains("refused")));

    // Bad input: a clear message, a non-zero exit, nothing changed.
    for (args, says) in [
        (vec!["service", "create", "--name", "x", "--network", "app", "--publish", "70000:80"], "bad published port"),
        (vec!["service", "create", "--name", "x", "--network", "nosuch", "--publish", "30090:80"], "no network"),
        (vec!["service", "create", "--name", "y", "--network", "app", "--publish", "30080:80"], "30080"),
        (vec!["task", "attach", "--service", "nosuch", "--node", "node1"], "no service \"nosuch\""),
        (vec!["network", "create", "--subnet", "bogus", "n2"], "--subnet"),
        (vec!["network", "create", "--subnet", "198.19.0.0/25", "n2"], "overlaps"),
        (vec!["node", "update", "--availability", "sideways", "node1"], "sideways"),
        (vec!["task", "detach", "web.9"], "no task"),
        (DNSRR_PUBLISHED.to_vec(), "dnsrr cannot be published through the routing mesh"),
        (DNSRR_VIP.to_vec(), "--vip-port needs --endpoint-mode vip"),
    ] {
        let o = g.cli(1, &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(text(&o.stderr).contains(says), "{args:?}: {}", text(&o.stderr));
    }
    // (web and api, the lab's.)
    assert!(g.cli_ok(1, &["service", "ls"]).lines().count() == 3, "the refused service was not made");
    // A dnsrr service: no VIP, no routing mesh (DNS answers with its tasks).
    #[rustfmt::skip]
    g.cli_ok(1, &["service", "create", "--name", "db", "--network", "app", "--endpoint-mode", "dnsrr", "--target-port", "5432"]);
    let ls = g.cli_ok(1, &["service", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with("db ") && l.contains("dnsrr")), "{ls}");
    g.cli_ok(1, &["service", "rm", "db"]);

    // Out of descriptors: node2's admin socket keeps listening through it
    // (it used to stop accepting for good at the first failed accept).
    admin_socket_outlives_running_out_of_descriptors(&g, 2);

    // node3 crashes: its task leaves node1's and node2's balancers within
    // seconds, every request is still answered, by the others.
    let stop = g.lab(&["stop-node", "3", "--kill"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let t = wait("web.3 out of node1's and node2's balancers", 10, || {
        !g.backends(1).contains(&ip3) && !g.backends(2).contains(&ip3)
    });
    eprintln!("node3 killed: its task left the other balancers within {:.1} s", t.as_secs_f64());
    assert!(g.cli_ok(1, &["node", "ls"]).lines().any(|l| l.starts_with("node3") && l.contains("down")));
    assert_eq!(answered(1, 6), set(&["web.1", "web.2"]));
    // It comes back from its state directory: so does its task.
    let start = g.lab(&["start-node", "3"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    wait("web.3 back in node1's and node2's balancers", 20, || {
        g.backends(1).contains(&ip3) && g.backends(2).contains(&ip3)
    });
    wait("web.3 answering again", 10, || get(2, 30080).is_ok_and(|b| b.starts_with("web.3")));

    // The Raft leader (node1) dies: writes go on through node2 (a new
    // leader), and node1 catches up when it is back.
    let stop = g.lab(&["stop-node", "1", "--kill"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    wait("a write through node2 after the leader died", 20, || g.cli(2, &["task", "drain", "web.2"]).status.success());
    let start = g.lab(&["start-node", "1"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    // Drained: web.2 takes no new connections, on any node (node1 has
    // its tables again once it has the state).
    for n in 1..=3 {
        wait("web.2 drained everywhere", 20, || has(n, &[&ip1, &ip3]));
    }
    for n in 1..=3 {
        assert_eq!(answered(n, 16), set(&["web.1", "web.3"]), "through node{n} with web.2 drained");
    }

    // Detached: web.3's port leaves its namespace, requests go to web.1.
    g.cli_ok(3, &["task", "detach", "web.3"]);
    wait("web.3's interface removed", 10, || {
        let o = Command::new("ip").args(["-n", "mp-lab-t3", "-4", "addr", "show"]).output().expect("ip addr");
        !text(&o.stdout).contains(&ip3)
    });
    for n in 1..=3 {
        wait("web.3 out of the balancers", 10, || has(n, &[&ip1]));
        assert_eq!(answered(n, 3), set(&["web.1"]));
    }

    // The service removed: connections are refused at once (the node's
    // kernel answers a SYN to a port nobody serves with a reset).
    g.cli_ok(2, &["service", "rm", "web"]);
    wait("the service gone from node1's tables", 10, || g.backends(1).is_empty());
    let t0 = Instant::now();
    let e = get(1, 30080).expect_err("the service is gone");
    assert!(e.contains("refused"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2), "refused at once, not timed out ({:?})", t0.elapsed());

    // A worker cannot change the cluster (as `docker service create` on a
    // worker): node3 demoted renews its certificate as a worker, leaves
    // Raft and is refused; promoted again, it is a manager and may.
    let role3 = || {
        let o = g.cli(3, &["cluster", "info", "--format", "json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()["role"].as_str().map(str::to_owned)
    };
    let create =
        ["service", "create", "--name", "admin", "--network", "app", "--vip-port", "81", "--target-port", "8080"];
    g.cli_ok(1, &["node", "demote", "node3"]);
    wait("node3 a worker", 20, || role3().as_deref() == Some("worker"));
    let o = g.cli(3, &create);
    assert!(!o.status.success(), "a worker created a service");
    assert!(text(&o.stderr).contains("this node is not a manager"), "{}", text(&o.stderr));
    wait("node3's Raft log removed", 10, || !g.0.join("node3/raft").exists());
    g.cli_ok(2, &["node", "promote", "node3"]);
    wait("node3 a manager again", 20, || role3().as_deref() == Some("manager"));
    wait("a write through node3 as a manager", 20, || g.cli(3, &create).status.success());
    g.cli_ok(3, &["service", "rm", "admin"]);

    // SIGTERM: a clean stop (XDP program detached, the task port it made
    // removed, the state directory kept; it resumes from it).
    let stop = g.lab(&["stop-node", "2"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let links = text(&run(&["ip", "-n", "mp-lab-n2", "-d", "link", "show"]).stdout);
    assert!(!links.contains("prog/xdp") && !links.contains("xdpgeneric") && !links.contains("mpt"), "{links}");
    let log = std::fs::read_to_string(g.0.join("node2.log")).unwrap_or_default();
    assert!(log.contains("stopped;"), "{log}");
    assert!(g.0.join("node2/node.json").exists() && g.0.join("node2/raft").exists());
    let start = g.lab(&["start-node", "2"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    wait("node2 back with its tables", 20, || g.cli(2, &["node", "ls"]).status.success());

    let left = run(&["ip", "netns", "list"]);
    assert!(text(&left.stdout).contains("mp-lab-n1"));
    drop(g);
    let left = run(&["ip", "netns", "list"]);
    assert!(!text(&left.stdout).contains("mp-lab-"), "lab down left namespaces");
}
