//! The underlay MTU and the data-path port end to end (issue 18, items 4
//! and 5), on a two-node cluster built with the CLI in namespaces of our
//! own (`mp-mt…`): each node's underlay MTU read from its data NIC (or
//! `--data-path-mtu`), networks checked against the smallest one at
//! `network create`, a jumbo fabric carrying a jumbo network, and a
//! cluster initialised with `--data-path-port` carrying its overlay on
//! that port.
//!
//! Topology: `fab` holds two bridges, br0 (the underlay, MTU as the test
//! asks) and br1 (management: Raft, joins, gossip); node n's data address
//! is 198.18.0.n (AF_XDP: a veth `up0` the kernel also holds; TAP: the
//! device the node makes, moved onto br0), management 198.18.1.n; task n
//! in its own namespace, its port made by its node (`task attach
//! --netns`).

use crate::Io;
use crate::lab::{BIN, Lab, in_ns, in_ns_ok, ip, run, wait_for};
use std::path::PathBuf;
use std::process::{Command, Output};

/// A two-node managed cluster in namespaces `mp-mt<tag>-…`.
pub(crate) struct Managed {
    pub(crate) lab: Lab,
    fab: String,
    pub(crate) tasks: Vec<String>,
    dir: PathBuf,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Managed {
    /// Two nodes on a fabric of MTU `fabric_mtu`, each started with
    /// `node_args` more; not yet a cluster.
    pub(crate) fn nodes(tag: &str, io: Io, fabric_mtu: u16, node_args: &[&str]) -> Managed {
        let mut lab = Lab::new(&format!("mt{tag}"));
        let fab = lab.ns("fab");
        let m = fabric_mtu.to_string();
        for br in ["br0", "br1"] {
            ip(&format!("-n {fab} link add {br} type bridge"));
            ip(&format!("-n {fab} link set {br} up"));
        }
        ip(&format!("-n {fab} link set br0 mtu {m}"));
        for f in ["iptables", "ip6tables", "arptables"] {
            let _ = in_ns(&fab, &["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{f}=0")]);
        }
        let dir = lab.dir.clone();
        let mut tasks = Vec::new();
        for n in 1..=2u8 {
            let ns = lab.ns(&format!("n{n}"));
            tasks.push(lab.ns(&format!("t{n}")));
            ip(&format!("link add m{n} netns {fab} type veth peer name mg0 netns {ns}"));
            ip(&format!("-n {fab} link set m{n} master br1 up"));
            ip(&format!("-n {ns} link set mg0 up"));
            ip(&format!("-n {ns} addr add 198.18.1.{n}/24 dev mg0"));
            let mac = format!("02:00:00:00:00:0{n}");
            let uplink = match io {
                Io::Afxdp => {
                    ip(&format!("link add d{n} netns {fab} type veth peer name up0 netns {ns}"));
                    ip(&format!("-n {fab} link set d{n} mtu {m} master br0 up"));
                    ip(&format!("-n {ns} link set up0 address {mac} mtu {m} up"));
                    ip(&format!("-n {ns} addr add 198.18.0.{n}/24 dev up0"));
                    in_ns_ok(&ns, &["ethtool", "-K", "up0", "tx", "off"]);
                    "up0"
                }
                Io::Tap => "mpup",
            };
            let state = dir.join(format!("node{n}"));
            let stats = dir.join(format!("stats{n}.json"));
            #[rustfmt::skip]
            let mut args = vec![
                BIN.to_owned(), "node".into(), "run".into(), "--name".into(), format!("node{n}"),
                "--state-dir".into(), state.display().to_string(),
                "--advertise-addr".into(), format!("198.18.1.{n}"),
                "--data-path-addr".into(), format!("198.18.0.{n}"),
                "--data-iface".into(), uplink.into(), "--data-mac".into(), mac,
                "--io".into(), io.arg().into(), "--metrics-addr".into(), "off".into(),
                "--stats-file".into(), stats.display().to_string(),
            ];
            args.extend(node_args.iter().map(|s| (*s).to_owned()));
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = lab.spawn(&ns, &format!("node{n}"), &argv);
            let sock = state.join("admin.sock");
            wait_for(&format!("node{n} to start"), 20, || {
                assert!(lab.running(p), "node{n} exited:\n{}", lab.log(p));
                sock.exists() && stats.exists()
            });
            if io == Io::Tap {
                // The node made its TAP uplink: onto the underlay with it.
                ip(&format!("-n {ns} link set mpup netns {fab}"));
                ip(&format!("-n {fab} link set mpup name u{n}"));
                ip(&format!("-n {fab} link set u{n} master br0 up"));
            }
        }
        Managed { lab, fab, tasks, dir }
    }

    /// The CLI against node `n`.
    pub(crate) fn cli(&self, n: u8, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.join(format!("node{n}")))
            .output()
            .expect("running meshplane")
    }

    pub(crate) fn cli_ok(&self, n: u8, args: &[&str]) -> String {
        let o = self.cli(n, args);
        assert!(o.status.success(), "meshplane {args:?} on node{n}: {}{}", text(&o.stdout), text(&o.stderr));
        text(&o.stdout)
    }

    /// `cluster init` on node 1 with `init_args` more, node 2 joined as a
    /// manager; the init's output.
    pub(crate) fn cluster(&self, init_args: &[&str]) -> String {
        let mut args = vec!["cluster", "init"];
        args.extend_from_slice(init_args);
        let init = self.cli_ok(1, &args);
        let token = init
            .split_whitespace()
            .find(|w| w.starts_with("MPTKN-") && init.contains(&format!("manager: meshplane cluster join --token {w}")))
            .expect("a manager token")
            .to_owned();
        self.cli_ok(2, &["cluster", "join", "--token", &token, "198.18.1.1"]);
        init
    }

    /// Service `web` on network `net` with a task on each node (task n in
    /// its namespace); waits for both tasks' interfaces. The tasks'
    /// addresses.
    pub(crate) fn tasks_on(&self, net: &str) -> Vec<String> {
        self.cli_ok(
            1,
            &["service", "create", "--name", "web", "--network", net, "--vip-port", "80", "--target-port", "5001"],
        );
        for n in 1..=2u8 {
            let (node, id) = (format!("node{n}"), format!("web.{n}"));
            let ns = &self.tasks[usize::from(n) - 1];
            self.cli_ok(1, &["task", "attach", "--service", "web", "--node", &node, "--netns", ns, "--id", &id]);
        }
        let ls: serde_json::Value =
            serde_json::from_str(&self.cli_ok(1, &["task", "ls", "--format", "json"])).expect("task ls json");
        let ips: Vec<String> = (1..=2)
            .map(|n| {
                ls.as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["id"] == format!("web.{n}").as_str())
                    .and_then(|t| t["ip"].as_str())
                    .expect("a task's address")
                    .to_owned()
            })
            .collect();
        for ns in &self.tasks {
            wait_for(&format!("the task's interface in {ns}"), 20, || {
                !text(&in_ns(ns, &["ip", "-4", "route", "show", "default"]).stdout).is_empty()
            });
        }
        ips
    }

    /// A TCP transfer of `bytes` from task 1 to a sink in task 2 at `to`,
    /// checked byte for byte by the sink; its answer line.
    pub(crate) fn tcp(&mut self, to: &str, bytes: u64) -> String {
        let (t1, t2) = (self.tasks[0].clone(), self.tasks[1].clone());
        let listen = format!("{to}:5001");
        let sink = self.lab.spawn(&t2, "tcp-sink", &[BIN, "tool", "tcp-sink", "--listen", &listen, "--timeout", "20"]);
        let lab = &mut self.lab;
        wait_for("the sink to listen", 10, || {
            assert!(lab.running(sink), "sink exited: {}", lab.log(sink));
            text(&in_ns(&t2, &["ss", "-ltn"]).stdout).contains(":5001 ")
        });
        let out = in_ns_ok(
            &t1,
            &[BIN, "tool", "tcp-source", "--connect", &listen, "--bytes", &bytes.to_string(), "--timeout", "20"],
        );
        wait_for("the sink to finish", 10, || !lab.running(sink));
        out.trim().to_owned()
    }
}

/// On a 1500-byte underlay `network create --mtu 9000` is refused with a
/// message naming the node and its underlay MTU; the largest allowed
/// (1450) is taken. Read from the NIC (AF_XDP: up0's 1500; TAP: the
/// device's default 1500).
pub(crate) fn mtu_refused_on_a_small_underlay(io: Io) {
    // The VXLAN port is the cluster's: a node's own is refused before it
    // touches anything.
    let o =
        Command::new(BIN).args(["node", "run", "--io", io.arg(), "--data-path-port", "4790"]).output().expect("run");
    assert!(!o.status.success() && text(&o.stderr).contains("is the cluster's"), "{}", text(&o.stderr));
    let c = Managed::nodes(&format!("r{}", &io.arg()[..1]), io, 1500, &[]);
    c.cluster(&[]);
    let o = c.cli(1, &["network", "create", "--subnet", "198.19.0.0/24", "--mtu", "9000", "big"]);
    assert!(!o.status.success(), "a 9000-byte network on a 1500-byte underlay was created");
    let e = text(&o.stderr);
    assert!(
        e.contains("mtu 9000 is too large: node \"node1\"'s underlay MTU is 1500, so a network's MTU is at most 1450"),
        "{e}"
    );
    assert!(!c.cli_ok(1, &["network", "ls"]).contains("big"), "nothing was made");
    c.cli_ok(1, &["network", "create", "--subnet", "198.19.0.0/24", "--mtu", "1450", "app"]);
    let node2: serde_json::Value =
        serde_json::from_str(&c.cli_ok(1, &["node", "inspect", "node2"])).expect("node inspect json");
    assert_eq!(node2["underlay_mtu"].as_u64(), Some(1500), "{node2}");
}

/// A jumbo fabric (MTU 9000): an 8950-byte network carries a DF ping of
/// exactly 8950 bytes and 8 MB of TCP checked byte for byte, with a TAP
/// uplink and with AF_XDP (multi-buffer: a frame in several 2 KiB UMEM
/// frames, received gathered and sent chained).
pub(crate) fn jumbo_underlay(io: Io) {
    // The TAP a node makes has the kernel's 1500: it is told the fabric's
    // (and sets its TAP to it); an AF_XDP node reads up0's 9000.
    let args: &[&str] = if io == Io::Tap { &["--data-path-mtu", "9000"] } else { &[] };
    let mut c = Managed::nodes(&format!("j{}", &io.arg()[..1]), io, 9000, args);
    c.cluster(&[]);
    if io == Io::Afxdp {
        let log = c.lab.log(0);
        assert!(log.contains("up0 queue 0: AF_XDP copy multi-buffer"), "{log}");
    }
    c.cli_ok(1, &["network", "create", "--subnet", "198.19.0.0/24", "--mtu", "8950", "jumbo"]);
    let ips = c.tasks_on("jumbo");
    let t1 = c.tasks[0].clone();
    assert!(text(&in_ns(&t1, &["ip", "link", "show", "eth0"]).stdout).contains("mtu 8950"));
    // 8922 bytes of ICMP data + 28 of headers: exactly the network MTU,
    // DF set, not segmented by anyone: the fabric carried 9000 bytes.
    let ping = in_ns(&t1, &["ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "8922", &ips[1]]);
    assert!(ping.status.success(), "a 8950-byte DF ping: {}{}", text(&ping.stdout), text(&ping.stderr));
    const BYTES: u64 = 8_000_000;
    let a = c.tcp(&ips[1], BYTES);
    assert!(a.starts_with(&format!("peer={}:", ips[0])) && a.ends_with(&format!("bytes={BYTES} ok")), "{a}");
    // Through the routing mesh: a client on the fabric (MTU 9000) to node
    // 1's published port, whose only task is on node 2, so node 1 sends
    // every frame back out of the port it came in on, 50 bytes larger
    // (VXLAN): first one segment of 1650 bytes (a 1716-byte frame: fits
    // one UMEM frame in, not out), then 8 MB in jumbo segments.
    let fab = c.fab.clone();
    let client = c.lab.ns("cl");
    ip(&format!("link add c0 netns {fab} type veth peer name eth0 netns {client}"));
    ip(&format!("-n {fab} link set c0 mtu 9000 master br0 up"));
    ip(&format!("-n {client} link set eth0 address 02:00:00:00:00:64 mtu 9000 up"));
    ip(&format!("-n {client} addr add 198.18.0.100/24 dev eth0"));
    // Complete checksums and MSS-sized segments on the wire, as a NIC's.
    in_ns_ok(&client, &["ethtool", "-K", "eth0", "tx", "off"]);
    c.cli_ok(1, &["service", "create", "--name", "pub", "--network", "jumbo", "--publish", "30080:5001"]);
    let t3 = c.lab.ns("t3");
    c.cli_ok(1, &["task", "attach", "--service", "pub", "--node", "node2", "--netns", &t3, "--id", "pub.1"]);
    wait_for("the published task's interface", 20, || {
        !text(&in_ns(&t3, &["ip", "-4", "route", "show", "default"]).stdout).is_empty()
    });
    let sink = c.lab.spawn(
        &t3,
        "mesh-sink",
        &[BIN, "tool", "tcp-sink", "--listen", "0.0.0.0:5001", "--count", "2", "--timeout", "20"],
    );
    wait_for("the mesh sink to listen", 10, || text(&in_ns(&t3, &["ss", "-ltn"]).stdout).contains(":5001 "));
    for bytes in [1650u64, 8_000_000] {
        let m = in_ns_ok(
            &client,
            &[
                BIN,
                "tool",
                "tcp-source",
                "--connect",
                "198.18.0.1:30080",
                "--bytes",
                &bytes.to_string(),
                "--timeout",
                "20",
            ],
        );
        assert!(m.trim().ends_with(&format!("bytes={bytes} ok")), "{bytes} bytes through the mesh: {m}");
    }
    let lab = &mut c.lab;
    wait_for("the mesh sink to finish", 10, || !lab.running(sink));
}

/// `cluster init --data-path-port 4790`: the overlay crosses the fabric
/// on udp 4790 (captured on the fabric's bridge), never on 4789, and a TCP
/// transfer between the nodes' tasks arrives byte for byte. The network
/// is `--internal`: a task's ping out of the cluster is dropped and
/// counted (`egress_internal`).
pub(crate) fn data_path_port(io: Io) {
    let mut c = Managed::nodes(&format!("p{}", &io.arg()[..1]), io, 1500, &[]);
    let bad = c.cli(1, &["cluster", "init", "--data-path-port", "80"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("1024 to 49151, or 4789"), "{}", text(&bad.stderr));
    let init = c.cluster(&["--data-path-port", "4790"]);
    assert!(init.contains("data path on udp port 4790"), "{init}");
    // Internal (no egress): inside the network all works, out of it the
    // node drops and counts.
    c.cli_ok(1, &["network", "create", "--internal", "--subnet", "198.19.0.0/24", "app"]);
    assert!(c.cli_ok(1, &["network", "ls"]).lines().any(|l| l.starts_with("app") && l.ends_with("yes")));
    let ips = c.tasks_on("app");
    let out = in_ns(&c.tasks[0], &["ping", "-c", "2", "-i", "0.2", "-W", "1", "198.18.77.7"]);
    assert!(!out.status.success(), "a task of an internal network reached outside");
    let stats = c.dir.join("stats1.json");
    wait_for("egress_internal counted on node1", 10, || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap_or_default()).unwrap_or_default();
        let sum: u64 =
            v["workers"].as_array().into_iter().flatten().filter_map(|w| w["drops"]["egress_internal"].as_u64()).sum();
        sum >= 2
    });
    let pcap = c.dir.join("fabric.pcap");
    let pcap_s = pcap.display().to_string();
    let fab = c.fab.clone();
    let cap = c.lab.spawn(&fab, "tcpdump", &["tcpdump", "-i", "br0", "-n", "-U", "-w", &pcap_s, "udp"]);
    wait_for("tcpdump to start", 10, || pcap.exists());
    std::thread::sleep(std::time::Duration::from_millis(300));
    const BYTES: u64 = 2_000_000;
    let a = c.tcp(&ips[1], BYTES);
    assert!(a.ends_with(&format!("bytes={BYTES} ok")), "{a}");
    c.lab.stop(cap);
    let count = |filter: &str| {
        let o = run(&["tcpdump", "-n", "-r", &pcap_s, filter]);
        text(&o.stdout).lines().count()
    };
    let (on_4790, on_4789) = (count("udp dst port 4790"), count("udp dst port 4789"));
    assert!(on_4790 >= 20, "{on_4790} packets to udp 4790 on the fabric");
    assert_eq!(on_4789, 0, "VXLAN on the default port");
    // Each node's tables say so, and its uplink steering follows them.
    let lb: serde_json::Value =
        serde_json::from_str(&c.cli_ok(2, &["lb", "ls", "--format", "json"])).expect("lb ls json");
    assert_eq!(lb["tables"]["node"]["vxlan_port"].as_u64(), Some(4790), "{}", lb["tables"]["node"]);
}
