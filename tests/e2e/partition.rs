//! Managers on real nodes in namespaces (`meshplane node run` with its
//! control plane, one management bridge, addresses 198.18.1.n), driven
//! with the CLI as a user drives them:
//!
//! - a partition test: nftables inside the nodes' namespaces drop the
//!   management plane (tcp 2377, gossip tcp/udp 7946) between one manager
//!   and the other two, three rounds of partition and heal (the leader cut
//!   off, a follower cut off, the leader again) with a writer on every
//!   node (`network create`, each name unique). Afterwards every manager
//!   has the same state at the same log index, every acknowledged write is
//!   there exactly once, in an order that agrees with real time (a write
//!   acknowledged before another began has the lower VNI: VNIs are given
//!   in log order), and every write through the cut-off manager was
//!   refused with a clear error, never acknowledged;
//! - a task attached by `--netns /proc/PID/ns/net` (a process in a
//!   namespace without a name): its port is configured there; names that
//!   are not namespaces are refused by the CLI, and the node's own
//!   namespace by the node.

use crate::lab::{BIN, Lab, in_ns, ip, run, wait_for};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The nftables table the partition lives in (one per node namespace).
const NFT_TABLE: &str = "mp_np_part";
/// Longest a CLI call may take (the node bounds its own waits: 10 s for a
/// commit, 12 s per manager it forwards to).
const CLI_CAP: Duration = Duration::from_secs(40);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One manager node.
struct Mgr {
    ns: String,
    state: PathBuf,
    proc_: usize,
}

/// `count` managers of one cluster (node1 initialised it, the others
/// joined as managers), removed on drop with the lab.
struct Managers {
    lab: Lab,
    nodes: Vec<Mgr>,
}

/// The CLI against the node whose state directory is `state`, killed
/// (by its pid) after [`CLI_CAP`].
fn cli_at(state: &std::path::Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running meshplane");
    let t0 = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t0.elapsed() < CLI_CAP {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    child.wait_with_output().expect("meshplane's output")
}

impl Managers {
    fn start(tag: &str, count: u8) -> Managers {
        let mut lab = Lab::new(tag);
        let fab = lab.ns("fab");
        ip(&format!("-n {fab} link add br1 type bridge"));
        ip(&format!("-n {fab} link set br1 up"));
        let _ = in_ns(&fab, &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]);
        let mut nodes = Vec::new();
        for n in 1..=count {
            let ns = lab.ns(&format!("n{n}"));
            ip(&format!("link add m{n} netns {fab} type veth peer name mg0 netns {ns}"));
            ip(&format!("-n {fab} link set m{n} master br1 up"));
            ip(&format!("-n {ns} link set mg0 up"));
            ip(&format!("-n {ns} addr add 198.18.1.{n}/24 dev mg0"));
            let state = lab.dir.join(format!("node{n}"));
            let p = lab.spawn(
                &ns,
                &format!("node{n}"),
                &[
                    BIN,
                    "node",
                    "run",
                    "--name",
                    &format!("node{n}"),
                    "--state-dir",
                    state.to_str().expect("utf-8 path"),
                    "--advertise-addr",
                    &format!("198.18.1.{n}"),
                    "--data-path-addr",
                    &format!("198.18.0.{n}"),
                    "--host-link",
                    &format!("198.18.250.{}/30", 4 * n),
                    "--data-iface",
                    "mpup",
                    "--data-mac",
                    &format!("02:00:00:00:00:0{n}"),
                    "--io",
                    "tap",
                ],
            );
            let sock = state.join("admin.sock");
            wait_for(&format!("node{n} to start"), 20, || {
                assert!(lab.running(p), "node{n} exited:\n{}", lab.log(p));
                sock.exists()
            });
            nodes.push(Mgr { ns, state, proc_: p });
        }
        let m = Managers { lab, nodes };
        let init = m.cli_ok(0, &["cluster", "init"]);
        let token = init
            .split_whitespace()
            .find(|w| w.starts_with("MPTKN-") && init.contains(&format!("manager: meshplane cluster join --token {w}")))
            .unwrap_or_else(|| panic!("no manager token in: {init}"))
            .to_owned();
        for i in 1..m.nodes.len() {
            m.cli_ok(i, &["cluster", "join", "--token", &token, "198.18.1.1"]);
        }
        m
    }

    fn cli(&self, i: usize, args: &[&str]) -> Output {
        cli_at(&self.nodes[i].state, args)
    }

    fn cli_ok(&self, i: usize, args: &[&str]) -> String {
        let o = self.cli(i, args);
        assert!(o.status.success(), "meshplane {args:?} on node{}: {}{}", i + 1, text(&o.stdout), text(&o.stderr));
        text(&o.stdout)
    }

    /// `args --format json` on node i (Null if it fails).
    fn json(&self, i: usize, args: &[&str]) -> Value {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--format", "json"]);
        let o = self.cli(i, &v);
        if !o.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    /// The leader as node i sees it (its index), if any.
    fn leader_seen_by(&self, i: usize) -> Option<usize> {
        let nodes = self.json(i, &["node", "ls"]);
        let name = nodes.as_array()?.iter().find(|n| n["manager_status"] == "leader")?["name"].as_str()?.to_owned();
        name.strip_prefix("node")?.parse::<usize>().ok()?.checked_sub(1)
    }

    /// The leader every node agrees on (waits for one).
    fn agreed_leader(&self) -> usize {
        let mut leader = None;
        wait_for("the managers to agree on a leader", 30, || {
            let seen: Vec<Option<usize>> = (0..self.nodes.len()).map(|i| self.leader_seen_by(i)).collect();
            leader = seen[0];
            leader.is_some() && seen.iter().all(|l| *l == leader)
        });
        leader.expect("a leader")
    }

    /// Drops the management plane (tcp 2377, gossip tcp and udp 7946, both
    /// directions) between node `minority` and the others, in every
    /// node's namespace.
    fn partition(&self, minority: usize) {
        let addr = |i: usize| format!("198.18.1.{}", i + 1);
        for (i, node) in self.nodes.iter().enumerate() {
            let peers: Vec<String> = if i == minority {
                (0..self.nodes.len()).filter(|&j| j != minority).map(addr).collect()
            } else {
                vec![addr(minority)]
            };
            let set = peers.join(", ");
            let rules = format!(
                "table inet {NFT_TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr {{ {set} }} meta l4proto {{ tcp, udp }} th dport {{ 2377, 7946 }} counter drop
    ip saddr {{ {set} }} meta l4proto {{ tcp, udp }} th sport {{ 2377, 7946 }} counter drop
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    ip daddr {{ {set} }} meta l4proto {{ tcp, udp }} th dport {{ 2377, 7946 }} counter drop
    ip daddr {{ {set} }} meta l4proto {{ tcp, udp }} th sport {{ 2377, 7946 }} counter drop
  }}
}}
"
            );
            let file = self.lab.dir.join(format!("partition-{i}.nft"));
            std::fs::write(&file, rules).expect("writing the rules");
            run(&["ip", "netns", "exec", &node.ns, "nft", "-f", file.to_str().expect("utf-8")]);
        }
    }

    /// Packets node i's partition rules dropped.
    fn dropped(&self, i: usize) -> u64 {
        let o = run(&["ip", "netns", "exec", &self.nodes[i].ns, "nft", "list", "table", "inet", NFT_TABLE]);
        let t = text(&o.stdout);
        let w: Vec<&str> = t.split_whitespace().collect();
        w.windows(2).filter(|p| p[0] == "packets").filter_map(|p| p[1].parse::<u64>().ok()).sum()
    }

    /// Removes the partition rules.
    fn heal(&self) {
        for node in &self.nodes {
            let _ = in_ns(&node.ns, &["nft", "delete", "table", "inet", NFT_TABLE]);
        }
    }

    /// Node i's (log index applied, networks).
    fn applied(&self, i: usize) -> Option<(u64, Value)> {
        let version = self.json(i, &["cluster", "info"])["version"].as_u64()?;
        let networks = self.json(i, &["network", "ls"]);
        networks.is_object().then_some((version, networks))
    }
}

/// One write by a writer.
#[derive(Debug)]
struct Write {
    round: usize,
    node: usize,
    name: String,
    /// Through the cut-off manager while the partition stood.
    minority: bool,
    start: Instant,
    end: Instant,
    acked: bool,
    err: String,
}

/// `network create` of `name` on the node at `state`, with the next free
/// /29 of 198.19.0.0/16.
fn write(state: &std::path::Path, next: &AtomicU32, name: &str) -> (Instant, Instant, bool, String) {
    let g = next.fetch_add(1, Ordering::Relaxed);
    let subnet = format!("198.19.{}.{}/29", g / 32, (g % 32) * 8);
    let start = Instant::now();
    let o = cli_at(state, &["network", "create", "--subnet", &subnet, name]);
    (start, Instant::now(), o.status.success(), text(&o.stderr).trim().to_owned())
}

/// Three rounds of partition and heal with a writer on every node; then
/// every acknowledged write everywhere, once, in an order that agrees
/// with real time, and no write through the cut-off manager acknowledged.
#[test]
fn partitions_lose_no_acknowledged_write() {
    crate::need_root!();
    let _g = crate::serial();
    let t_all = Instant::now();
    let m = Managers::start("np-pt", 3);
    let states: Vec<PathBuf> = m.nodes.iter().map(|n| n.state.clone()).collect();
    let next = AtomicU32::new(0);
    let mut writes: Vec<Write> = Vec::new();
    for round in 0..3 {
        let leader = m.agreed_leader();
        // The leader cut off (its writes cannot commit), then a follower
        // (it has no leader to forward to), then the (new) leader again.
        let minority = if round == 1 { (leader + 1) % 3 } else { leader };
        m.partition(minority);
        let t0 = Instant::now();
        let minority_done = AtomicBool::new(false);
        let round_writes: Vec<Write> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|node| {
                    let (state, next, minority_done) = (&states[node], &next, &minority_done);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        // The cut-off manager's writer goes on for 3 s (one
                        // write or two: each waits for its refusal); the
                        // others' until it is done, at most 20 writes.
                        loop {
                            let more = if node == minority {
                                t0.elapsed() < Duration::from_secs(3)
                            } else {
                                out.len() < 20
                                    && (!minority_done.load(Ordering::Relaxed) || t0.elapsed() < Duration::from_secs(3))
                            };
                            if !more {
                                break;
                            }
                            let name = format!("r{round}n{}w{}", node + 1, out.len());
                            let (start, end, acked, err) = write(state, next, &name);
                            out.push(Write { round, node, name, minority: node == minority, start, end, acked, err });
                        }
                        if node == minority {
                            minority_done.store(true, Ordering::Relaxed);
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().expect("a writer")).collect()
        });
        let dropped = m.dropped(minority);
        m.heal();
        let (acked, refused): (Vec<&Write>, Vec<&Write>) = round_writes.iter().partition(|w| w.acked);
        eprintln!(
            "round {round}: node{} cut off ({} packets dropped) for {:.1} s: {} writes acknowledged, {} refused",
            minority + 1,
            dropped,
            t0.elapsed().as_secs_f64(),
            acked.len(),
            refused.len()
        );
        for w in &refused {
            eprintln!(
                "  refused: {} through node{} after {:.1} s: {}",
                w.name,
                w.node + 1,
                (w.end - w.start).as_secs_f64(),
                w.err
            );
        }
        assert!(dropped > 0, "round {round}: the partition dropped nothing");
        let through_minority: Vec<&Write> = round_writes.iter().filter(|w| w.minority).collect();
        assert!(!through_minority.is_empty(), "round {round}: no write through the cut-off manager");
        for w in &through_minority {
            assert!(!w.acked, "round {round}: {} through the cut-off node{} was acknowledged", w.name, w.node + 1);
            assert!(
                ["no Raft quorum", "no answer", "no manager known", "refused"].iter().any(|e| w.err.contains(e)),
                "round {round}: {} through node{} refused without a clear reason: {:?}",
                w.name,
                w.node + 1,
                w.err
            );
        }
        assert!(
            round_writes.iter().any(|w| !w.minority && w.acked),
            "round {round}: the majority acknowledged no write"
        );
        writes.extend(round_writes);
        // Healed: every node takes writes again (the cut-off one once it
        // has caught up).
        for (node, state) in states.iter().enumerate() {
            let t = Instant::now();
            loop {
                let name = format!("h{round}n{}w{}", node + 1, writes.len());
                let (start, end, acked, err) = write(state, &next, &name);
                writes.push(Write { round, node, name, minority: false, start, end, acked, err: err.clone() });
                if acked {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "round {round}: node{} takes no write after healing: {err}",
                    node + 1
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    // Every manager has applied the same log: same index, same state.
    let mut agreed = None;
    wait_for("the managers to agree on the state", 30, || {
        let seen: Vec<Option<(u64, Value)>> = (0..3).map(|i| m.applied(i)).collect();
        let same = seen[0].is_some() && seen.iter().all(|s| *s == seen[0]);
        if same {
            agreed = seen[0].clone();
        }
        same
    });
    let (version, networks) = agreed.expect("agreed");
    let vni_of = |name: &str| networks[name]["vni"].as_u64();
    // Exactly once: one network per name, one name per VNI.
    let mut by_vni: BTreeMap<u64, &str> = BTreeMap::new();
    for (name, n) in networks.as_object().expect("networks") {
        let vni = n["vni"].as_u64().expect("a VNI");
        assert!(by_vni.insert(vni, name).is_none(), "VNI {vni} twice");
    }
    let acked: Vec<&Write> = writes.iter().filter(|w| w.acked).collect();
    for w in &acked {
        assert!(
            vni_of(&w.name).is_some(),
            "acknowledged write {} (node{}, round {}) is lost",
            w.name,
            w.node + 1,
            w.round
        );
    }
    // Acknowledged before another began: committed before it.
    for a in &acked {
        for b in &acked {
            if a.end < b.start {
                assert!(
                    vni_of(&a.name) < vni_of(&b.name),
                    "{} (acknowledged first) is after {} in the log",
                    a.name,
                    b.name
                );
            }
        }
    }
    // A refused write may still have committed (a timeout is not a "no"),
    // except through the cut-off manager, whose entries never reached a
    // quorum.
    for w in writes.iter().filter(|w| w.minority) {
        assert!(vni_of(&w.name).is_none(), "{} was refused through the cut-off node{} yet applied", w.name, w.node + 1);
    }
    let refused_present = writes.iter().filter(|w| !w.acked && vni_of(&w.name).is_some()).count();
    eprintln!(
        "after 3 partitions: {} writes, {} acknowledged and all present once in log order on every manager (log index {version}); {} refused, {} of them applied after all; {:.1} s in all",
        writes.len(),
        acked.len(),
        writes.len() - acked.len(),
        refused_present,
        t_all.elapsed().as_secs_f64()
    );
    for i in 0..m.nodes.len() {
        assert!(m.leader_seen_by(i).is_some(), "node{} knows no leader", i + 1);
    }
}

/// A process in a network namespace without a name (`unshare -n`),
/// killed by its pid on drop.
struct Unshared(std::process::Child);

impl Drop for Unshared {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `task attach --netns /proc/PID/ns/net`: the node moves the task's port
/// into that process's namespace and configures it there (address, MAC,
/// MTU, default route); detached, the port goes. A name that is not a
/// namespace is refused by the CLI; the node's own namespace by the node.
#[test]
fn task_attached_by_process_namespace() {
    crate::need_root!();
    let _g = crate::serial();
    let m = Managers::start("np-ta", 1);
    m.cli_ok(0, &["network", "create", "--subnet", "198.19.0.0/24", "app"]);
    m.cli_ok(
        0,
        &["service", "create", "--name", "web", "--network", "app", "--vip-port", "80", "--target-port", "8080"],
    );
    for (bad, says) in [
        ("a b", "--netns: task namespace \"a b\""),
        ("-all", "task namespace \"-all\""),
        ("../x", "task namespace \"../x\""),
        ("/a/../b", "/proc/PID/ns/net"),
        ("/etc/passwd", "/etc/passwd: not a network namespace"),
        ("/proc/12x/ns/net", "task namespace \"/proc/12x/ns/net\""),
    ] {
        let o = m.cli(0, &["task", "attach", "--service", "web", "--node", "node1", &format!("--netns={bad}")]);
        assert!(!o.status.success(), "--netns {bad:?} was taken");
        assert!(text(&o.stderr).contains(says), "--netns {bad:?}: {}", text(&o.stderr));
    }
    assert!(m.json(0, &["task", "ls"]).as_array().is_some_and(Vec::is_empty), "a refused task was made");

    let child = Command::new("unshare")
        .args(["-n", "sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .expect("running unshare (util-linux)");
    let proc_ns = Unshared(child);
    let pid = proc_ns.0.id();
    let path = format!("/proc/{pid}/ns/net");
    // unshare has made its namespace once it differs from ours.
    let ino = |p: &str| std::fs::metadata(p).map(|md| std::os::unix::fs::MetadataExt::ino(&md)).ok();
    wait_for("unshare's namespace", 5, || ino(&path).is_some() && ino(&path) != ino("/proc/self/ns/net"));
    let nsip = |args: &[&str]| {
        let mut v = vec!["nsenter", &*format!("--net={path}"), "ip"].into_iter().map(str::to_owned).collect::<Vec<_>>();
        v.extend(args.iter().map(|a| (*a).to_owned()));
        let o = Command::new(&v[0]).args(&v[1..]).output().expect("nsenter");
        text(&o.stdout)
    };
    m.cli_ok(0, &["task", "attach", "--service", "web", "--node", "node1", "--netns", &path, "--id", "web.1"]);
    let tasks = m.json(0, &["task", "ls"]);
    let t = &tasks[0];
    assert_eq!(t["netns"].as_str(), Some(path.as_str()), "{tasks}");
    let addr = t["ip"].as_str().expect("the task's address").to_owned();
    wait_for("web.1's port configured in the process's namespace", 15, || {
        let a = nsip(&["-4", "addr", "show", "dev", "eth0"]);
        a.contains(&format!("inet {addr}/24")) && nsip(&["route", "show", "default"]).contains("via 198.19.0.254")
    });
    let link = nsip(&["link", "show", "dev", "eth0"]);
    let o: Vec<u8> = addr.split('.').map(|x| x.parse().expect("octet")).collect();
    let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    assert!(link.contains(&mac) && link.contains("mtu 1450") && link.contains("UP"), "{link}");
    // Not in the node's namespace.
    let own = text(&run(&["ip", "-n", &m.nodes[0].ns, "-br", "link"]).stdout);
    assert!(!own.contains("eth0"), "{own}");

    // The node's own namespace as a task's: the state takes the form, the
    // node refuses to put a port there (its interfaces and routes stay).
    let node_pid = m.lab.procs[m.nodes[0].proc_].child.id();
    let routes_before = text(&run(&["ip", "-n", &m.nodes[0].ns, "route"]).stdout);
    let own_path = format!("/proc/{node_pid}/ns/net");
    m.cli_ok(0, &["task", "attach", "--service", "web", "--node", "node1", "--netns", &own_path, "--id", "web.2"]);
    let (lab, p) = (&m.lab, m.nodes[0].proc_);
    wait_for("the node to refuse its own namespace", 10, || lab.log(p).contains("is the node's own"));
    assert_eq!(text(&run(&["ip", "-n", &m.nodes[0].ns, "route"]).stdout), routes_before);
    let own = text(&run(&["ip", "-n", &m.nodes[0].ns, "-br", "link"]).stdout);
    assert!(!own.contains("eth0"), "{own}");

    // Detached: the port leaves the process's namespace.
    m.cli_ok(0, &["task", "detach", "web.1"]);
    wait_for("web.1's port removed", 10, || !nsip(&["-br", "link"]).contains("eth0"));
    drop(proc_ns);
}
