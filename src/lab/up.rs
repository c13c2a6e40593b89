//! `meshplane lab up`: the namespaces, the nodes, then the cluster built
//! with the CLI as a user builds it, and the tasks.

use super::common::{
    CLIENT_IP, NODES, OUTSIDE_IP, OUTSIDE_PORT, ROUTER_IP, attach_tap_uplink, cli, cluster_state, lab_namespaces,
    ns_name, spawn, wait,
};
use super::podman::{Podman, container_name};
use crate::node::IoKind;
use crate::sys::{self, in_ns, ip};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Builds the lab and starts its nodes and tasks.
pub(super) fn up(io: IoKind, dir: &Path, podman: bool) -> Result<()> {
    if lab_namespaces()?.next().is_some() {
        bail!("a lab is up already: `meshplane lab down` first");
    }
    let bin = std::env::current_exe()?.display().to_string();
    if podman {
        Podman::preflight(&bin).context("lab up --podman")?;
    }
    // Containers of an earlier lab in this directory (their nodes are gone).
    Podman::of(dir).down().context("removing the podman containers of an earlier lab")?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("io"), if io == IoKind::Tap { "tap" } else { "afxdp" })?;
    let fab = fabric()?;
    client(&fab, io)?;
    outside(&bin, dir, &fab)?;
    for n in 1..=NODES {
        boot_node(io, &bin, dir, &fab, n, podman)?;
    }
    build_cluster(&bin, dir, podman)?;
    start_tasks(&bin, dir, podman)?;
    let st = cluster_state(&bin, dir, 1)?;
    let tasks: Vec<String> = st["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!(
                "{} {} on {}",
                t["id"].as_str().unwrap_or("?"),
                t["ip"].as_str().unwrap_or("?"),
                t["node"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "lab up: {NODES} nodes (198.18.0.1-{NODES}, {} I/O; managers, Raft and gossip on 198.18.1.0/24), client {CLIENT_IP}, router {ROUTER_IP} to the outside server {OUTSIDE_IP}:{OUTSIDE_PORT}, service web published on every node at 30080 (nat) and 30081 (preserve-source), tasks {}",
        if io == IoKind::Tap { "TAP" } else { "AF_XDP" },
        tasks.join(", ")
    );
    if podman {
        let names: Vec<String> = (1..=NODES).map(container_name).collect();
        println!(
            "web's tasks are podman containers ({}; podman's files in {}/podman: CONTAINERS_CONF={}/podman/containers.conf CONTAINERS_STORAGE_CONF={}/podman/storage.conf podman ps)",
            names.join(", "),
            dir.display(),
            dir.display(),
            dir.display()
        );
    }
    println!(
        "the CLI on the lab: meshplane --state-dir {}/node1 node ls (or service ls, task ls, lb ls, stats)",
        dir.display()
    );
    println!("next: meshplane lab demo; meshplane lab down");
    Ok(())
}

/// A namespace with its loopback up.
fn netns_add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// A veth pair from the fabric's `bridge` (end `fab_end`) to `ns` (end
/// `ns_end`), the fabric's end up.
fn fabric_link(fab: &str, bridge: &str, fab_end: &str, ns: &str, ns_end: &str) -> Result<()> {
    ip(&["link", "add", fab_end, "netns", fab, "type", "veth", "peer", "name", ns_end, "netns", ns])?;
    ip(&["-n", fab, "link", "set", fab_end, "master", bridge, "up"])
}

/// The fabric: a namespace with the underlay (br0) and management (br1)
/// bridges; its name.
fn fabric() -> Result<String> {
    let fab = ns_name("fab");
    netns_add(&fab)?;
    for br in ["br0", "br1"] {
        ip(&["-n", &fab, "link", "add", br, "type", "bridge"])?;
        ip(&["-n", &fab, "link", "set", br, "up"])?;
    }
    let _ = in_ns(&fab, &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    Ok(fab)
}

/// The outside world: a namespace behind the fabric's router (198.18.2.0/24;
/// the fabric namespace forwards, inside itself only) with a server that
/// answers with the address it saw.
fn outside(bin: &str, dir: &Path, fab: &str) -> Result<()> {
    let out = ns_name("out");
    netns_add(&out)?;
    // A MAC of its own: a bridge takes its ports' lowest otherwise, which
    // changes as nodes join it, and the nodes' neighbour entries for the
    // router would go stale.
    ip(&["-n", fab, "link", "set", "br0", "address", "02:00:00:00:00:fe"])?;
    ip(&["-n", fab, "addr", "add", &format!("{ROUTER_IP}/24"), "dev", "br0"])?;
    ip(&["link", "add", "o0", "netns", fab, "type", "veth", "peer", "name", "eth0", "netns", &out])?;
    ip(&["-n", fab, "addr", "add", "198.18.2.1/24", "dev", "o0"])?;
    ip(&["-n", fab, "link", "set", "o0", "up"])?;
    ip(&["-n", &out, "addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"])?;
    ip(&["-n", &out, "link", "set", "eth0", "up"])?;
    ip(&["-n", &out, "route", "add", "default", "via", "198.18.2.1"])?;
    // Its checksums complete on the wire, as a real server's are (a veth
    // leaves them partial, and an AF_XDP uplink cannot tell).
    sys::tx_offload_off(Some(&out), "eth0")?;
    in_ns(fab, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let listen = format!("{OUTSIDE_IP}:{OUTSIDE_PORT}");
    spawn(dir, &out, "outside.log", &[bin, "tool", "http-name", "--listen", &listen, "--name", "outside"])?;
    Ok(())
}

/// The client, on the underlay (with an AF_XDP uplink, its checksums
/// complete on the wire; a TAP uplink takes its super-frames).
fn client(fab: &str, io: IoKind) -> Result<()> {
    let client = ns_name("c");
    netns_add(&client)?;
    fabric_link(fab, "br0", "c", &client, "eth0")?;
    ip(&["-n", &client, "link", "set", "eth0", "address", "02:00:00:00:00:64", "up"])?;
    ip(&["-n", &client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
    if io == IoKind::Afxdp {
        sys::tx_offload_off(Some(&client), "eth0")?;
    }
    Ok(())
}

/// Node `n`: its namespace and its task's (with `podman` the task is a
/// container, whose namespace podman makes), its management NIC, its data
/// NIC (AF_XDP: a veth on the underlay; TAP: the device the node makes,
/// moved onto the underlay once it runs), and its process.
fn boot_node(io: IoKind, bin: &str, dir: &Path, fab: &str, n: u8, podman: bool) -> Result<()> {
    let (ns, tns) = (ns_name(&format!("n{n}")), ns_name(&format!("t{n}")));
    netns_add(&ns)?;
    if !podman {
        netns_add(&tns)?;
    }
    // Management NIC on br1 (Raft, joins, gossip).
    fabric_link(fab, "br1", &format!("m{n}"), &ns, "mg0")?;
    ip(&["-n", &ns, "link", "set", "mg0", "up"])?;
    ip(&["-n", &ns, "addr", "add", &format!("198.18.1.{n}/24"), "dev", "mg0"])?;
    let data_mac = format!("02:00:00:00:00:0{n}");
    let uplink = match io {
        IoKind::Afxdp => {
            fabric_link(fab, "br0", &format!("n{n}"), &ns, "up0")?;
            ip(&["-n", &ns, "link", "set", "up0", "address", &data_mac, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("198.18.0.{n}/24"), "dev", "up0"])?;
            sys::tx_offload_off(Some(&ns), "up0")?;
            "up0"
        }
        IoKind::Tap => {
            // The kernel's own leg on the underlay (meshplane holds the
            // data address on its TAP): the node's FIB and neighbours.
            fabric_link(fab, "br0", &format!("k{n}"), &ns, "k0")?;
            ip(&["-n", &ns, "link", "set", "k0", "address", &format!("02:00:00:00:02:0{n}"), "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("198.18.0.1{n}/24"), "dev", "k0"])?;
            "mpup"
        }
    };
    // Egress: the tasks' way out is the node's default route.
    ip(&["-n", &ns, "route", "add", "default", "via", ROUTER_IP])?;
    let stats = dir.join(format!("stats{n}.json"));
    let state = dir.join(format!("node{n}"));
    let args: [&str; 21] = [
        bin,
        "node",
        "run",
        "--name",
        &format!("node{n}"),
        "--state-dir",
        &state.display().to_string(),
        "--advertise-addr",
        &format!("198.18.1.{n}"),
        "--data-path-addr",
        &format!("198.18.0.{n}"),
        "--data-iface",
        uplink,
        "--data-mac",
        &data_mac,
        "--io",
        if io == IoKind::Tap { "tap" } else { "afxdp" },
        "--stats-file",
        &stats.display().to_string(),
        "--host-link",
        &format!("198.18.250.{}/30", 4 * n),
    ];
    std::fs::write(dir.join(format!("node{n}.args")), args.join("\n"))?;
    spawn(dir, &ns, &format!("node{n}.log"), &args)?;
    wait(&format!("node {n} to start (see {}/node{n}.log)", dir.display()), 20, || {
        stats.exists() && state.join("admin.sock").exists()
    })?;
    if io == IoKind::Tap {
        attach_tap_uplink(n)?;
    }
    Ok(())
}

/// The cluster, as a user makes it: node1 initialises it, the others
/// join as managers (three managers: Raft survives one failure); the
/// network `app` and the service `web`, a task of it on every node; the
/// service `api` (a VIP on every port), its task on node 3, which the
/// demo calls by name from web's tasks. With `podman`, web's tasks are
/// containers that the CNI plugin attaches (`podman.rs`), in node order so
/// that their ids are web.1, web.2, web.3.
fn build_cluster(bin: &str, dir: &Path, podman: bool) -> Result<()> {
    let init = cli(bin, dir, 1, &["cluster", "init"])?;
    let token = init
        .split_whitespace()
        .find(|w| w.starts_with("MPTKN-") && init.contains(&format!("manager: meshplane cluster join --token {w}")))
        .context("no manager token in `cluster init`'s output")?
        .to_owned();
    for n in 2..=NODES {
        cli(bin, dir, n, &["cluster", "join", "--token", &token, "198.18.1.1"])?;
    }
    cli(bin, dir, 1, &["network", "create", "--subnet", "198.19.0.0/24", "app"])?;
    #[rustfmt::skip]
    cli(bin, dir, 2, &["service", "create", "--name", "web", "--network", "app", "--vip-port", "80",
        "--publish", "30080:8080", "--publish", "mode=preserve-source,30081:8080", "--scheduler", "rr"])?;
    if podman {
        let pm = Podman::of(dir);
        pm.setup()?;
        for n in 1..=NODES {
            pm.install(bin, dir, n)?;
            pm.run_web(bin, dir, n)?;
        }
    } else {
        for n in 1..=NODES {
            let tns = ns_name(&format!("t{n}"));
            let id = format!("web.{n}");
            let node = format!("node{n}");
            cli(bin, dir, 3, &["task", "attach", "--service", "web", "--node", &node, "--netns", &tns, "--id", &id])?;
        }
    }
    cli(bin, dir, 1, &["service", "create", "--name", "api", "--network", "app", "--target-port", "8080"])?;
    let ans = ns_name("a1");
    netns_add(&ans)?;
    cli(bin, dir, 1, &["task", "attach", "--service", "api", "--node", "node3", "--netns", &ans, "--id", "api.1"])?;
    Ok(())
}

/// Each task's server, once its node has made its port (when its tables
/// arrive); web's containers (`podman`) run theirs already.
fn start_tasks(bin: &str, dir: &Path, podman: bool) -> Result<()> {
    for n in (1..=NODES).filter(|_| !podman) {
        let tns = ns_name(&format!("t{n}"));
        wait(&format!("web.{n}'s interface in {tns} (see {}/node{n}.log)", dir.display()), 20, || {
            sys::output("ip", &["-n", &tns, "-4", "route", "show", "default"]).is_ok_and(|o| !o.is_empty())
        })?;
        spawn(
            dir,
            &tns,
            &format!("web.{n}.log"),
            &[bin, "tool", "http-name", "--listen", "0.0.0.0:8080", "--name", &format!("web.{n}")],
        )?;
    }
    let ans = ns_name("a1");
    wait(&format!("api.1's interface in {ans} (see {}/node3.log)", dir.display()), 20, || {
        sys::output("ip", &["-n", &ans, "-4", "route", "show", "default"]).is_ok_and(|o| !o.is_empty())
    })?;
    spawn(dir, &ans, "api.1.log", &[bin, "tool", "http-name", "--listen", "0.0.0.0:8080", "--name", "api.1"])?;
    Ok(())
}
