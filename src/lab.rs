//! `meshplane lab up|status|demo|down`: a cluster on this one machine, in
//! network namespaces named `mp-lab-*`, addresses from 198.18.0.0/15.
//!
//! Three nodes, each a namespace with a data NIC on a shared underlay
//! fabric (a bridge) and a management NIC on a second one; a client
//! namespace on the fabric; an overlay network `app` and a service `web`
//! published on every node in both modes (30080 `nat`, 30081
//! `preserve-source`) with one task per node, each in its own namespace,
//! running a small HTTP server that answers with its name and the client
//! address it saw.
//!
//! The nodes run with their control plane (`meshplane node run`, state in
//! the lab directory), and the lab builds the cluster the way a user does,
//! with the CLI: `cluster init` on node1, `cluster join` on the others
//! (all three managers), `network create`, `service create`, `task attach
//! --netns` (the nodes make the tasks' ports). `down` removes everything,
//! also after a crash (it works from the namespaces and pid files it
//! finds).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command as Cmd, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "mp-lab-";
const NODES: u8 = 3;
const CLIENT_IP: &str = "198.18.0.100";

/// `meshplane lab …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum LabCommand {
    /// Build the lab and start its nodes and tasks.
    Up {
        /// I/O backend of the nodes.
        #[arg(long, value_enum, default_value = "afxdp")]
        io: crate::node::IoKind,
        /// Where the lab keeps its files (tables, logs, counters, pids).
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Show what runs and the nodes' counters.
    Status {
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Send requests through the routing mesh to every node's published
    /// ports, in both modes, and print who answered and what they saw.
    Demo {
        /// Requests per node and published port.
        #[arg(long, default_value_t = 3)]
        requests: u32,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Stop one node's process (SIGTERM, or SIGKILL with --kill: a crash),
    /// to watch the cluster notice.
    StopNode {
        /// The node: 1, 2 or 3.
        node: u8,
        /// SIGKILL instead of SIGTERM.
        #[arg(long)]
        kill: bool,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Start a stopped node again (it resumes from its state directory).
    StartNode {
        /// The node: 1, 2 or 3.
        node: u8,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Stop everything and remove the namespaces (also after a crash).
    Down {
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
}

pub(crate) fn run(c: &LabCommand) -> Result<()> {
    match c {
        LabCommand::Up { io, dir } => up(*io, dir),
        LabCommand::Status { dir } => status(dir),
        LabCommand::Demo { requests, dir } => demo(*requests, dir),
        LabCommand::Down { dir } => down(dir),
        LabCommand::StopNode { node, kill, dir } => stop_node(*node, *kill, dir),
        LabCommand::StartNode { node, dir } => start_node(*node, dir),
    }
}

/// Runs a command; its stderr in the error if it fails.
pub(crate) fn sh(args: &[&str]) -> Result<()> {
    let out = Cmd::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip` with the space-separated `args`.
pub(crate) fn ip(args: &str) -> Result<()> {
    let mut v = vec!["ip"];
    v.extend(args.split_whitespace());
    sh(&v)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

fn ns_name(s: &str) -> String {
    format!("{PREFIX}{s}")
}

/// Starts `args` in `ns`, detached, output to `log`; writes its pid into
/// the lab's pid list.
fn spawn(dir: &Path, ns: &str, log: &str, args: &[&str]) -> Result<u32> {
    let f = std::fs::File::create(dir.join(log))?;
    let child = Cmd::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", args.join(" ")))?;
    let pid = child.id();
    let mut pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
    pids.push_str(&format!("{pid} {log}\n"));
    std::fs::write(dir.join("pids"), pids)?;
    Ok(pid)
}

/// Runs the meshplane CLI against node `n`'s admin socket; its stdout.
fn cli(bin: &str, dir: &Path, n: u8, args: &[&str]) -> Result<String> {
    let state = dir.join(format!("node{n}"));
    let out = Cmd::new(bin)
        .args(args)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .with_context(|| format!("running meshplane {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("meshplane {} (node{n}): {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cluster state as node `n` knows it (JSON).
fn cluster_state(bin: &str, dir: &Path, n: u8) -> Result<serde_json::Value> {
    let out = cli(bin, dir, n, &["network", "ls", "--format", "json"])?;
    let networks: serde_json::Value = serde_json::from_str(&out)?;
    let out = cli(bin, dir, n, &["task", "ls", "--format", "json"])?;
    let tasks: serde_json::Value = serde_json::from_str(&out)?;
    Ok(serde_json::json!({ "networks": networks, "tasks": tasks }))
}

fn wait(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(secs) {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn up(io: crate::node::IoKind, dir: &Path) -> Result<()> {
    use crate::node::IoKind;
    if lab_namespaces()?.next().is_some() {
        bail!("a lab is up already: `meshplane lab down` first");
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = std::env::current_exe()?.display().to_string();
    std::fs::write(dir.join("io"), if io == IoKind::Tap { "tap" } else { "afxdp" })?;
    let fab = ns_name("fab");
    ip(&format!("netns add {fab}"))?;
    ip(&format!("-n {fab} link set lo up"))?;
    for br in ["br0", "br1"] {
        ip(&format!("-n {fab} link add {br} type bridge"))?;
        ip(&format!("-n {fab} link set {br} up"))?;
    }
    let _ = in_ns(&fab, &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    // The client.
    let client = ns_name("c");
    ip(&format!("netns add {client}"))?;
    ip(&format!("-n {client} link set lo up"))?;
    ip(&format!("link add c netns {fab} type veth peer name eth0 netns {client}"))?;
    ip(&format!("-n {fab} link set c master br0 up"))?;
    ip(&format!("-n {client} link set eth0 address 02:00:00:00:00:64 up"))?;
    ip(&format!("-n {client} addr add {CLIENT_IP}/24 dev eth0"))?;
    in_ns(&client, &["ethtool", "-K", "eth0", "tx", "off"])?;
    for n in 1..=NODES {
        let (ns, tns) = (ns_name(&format!("n{n}")), ns_name(&format!("t{n}")));
        for x in [&ns, &tns] {
            ip(&format!("netns add {x}"))?;
            ip(&format!("-n {x} link set lo up"))?;
        }
        // Management NIC on br1 (Raft, joins, gossip).
        ip(&format!("link add m{n} netns {fab} type veth peer name mg0 netns {ns}"))?;
        ip(&format!("-n {fab} link set m{n} master br1 up"))?;
        ip(&format!("-n {ns} link set mg0 up"))?;
        ip(&format!("-n {ns} addr add 198.18.1.{n}/24 dev mg0"))?;
        let data_mac = format!("02:00:00:00:00:0{n}");
        let uplink = match io {
            IoKind::Afxdp => {
                ip(&format!("link add n{n} netns {fab} type veth peer name up0 netns {ns}"))?;
                ip(&format!("-n {fab} link set n{n} master br0 up"))?;
                ip(&format!("-n {ns} link set up0 address {data_mac} up"))?;
                ip(&format!("-n {ns} addr add 198.18.0.{n}/24 dev up0"))?;
                in_ns(&ns, &["ethtool", "-K", "up0", "tx", "off"])?;
                "up0"
            }
            IoKind::Tap => "mpup",
        };
        let stats = dir.join(format!("stats{n}.json"));
        let state = dir.join(format!("node{n}"));
        let args: [&str; 19] = [
            &bin,
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
        ];
        std::fs::write(dir.join(format!("node{n}.args")), args.join("\n"))?;
        spawn(dir, &ns, &format!("node{n}.log"), &args)?;
        wait(&format!("node {n} to start (see {}/node{n}.log)", dir.display()), 20, || {
            stats.exists() && state.join("admin.sock").exists()
        })?;
        if io == IoKind::Tap {
            attach_tap_uplink(n)?;
        }
    }
    // The cluster, as a user makes it: node1 initialises it, the others
    // join as managers (three managers: Raft survives one failure).
    let init = cli(&bin, dir, 1, &["cluster", "init"])?;
    let token = init
        .split_whitespace()
        .find(|w| w.starts_with("MPTKN-") && init.contains(&format!("manager: meshplane cluster join --token {w}")))
        .context("no manager token in `cluster init`'s output")?
        .to_owned();
    for n in 2..=NODES {
        cli(&bin, dir, n, &["cluster", "join", "--token", &token, "198.18.1.1"])?;
    }
    cli(&bin, dir, 1, &["network", "create", "--subnet", "198.19.0.0/24", "app"])?;
    cli(
        &bin,
        dir,
        2,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "app",
            "--vip-port",
            "80",
            "--publish",
            "30080:8080",
            "--publish",
            "mode=preserve-source,30081:8080",
            "--scheduler",
            "rr",
        ],
    )?;
    for n in 1..=NODES {
        let tns = ns_name(&format!("t{n}"));
        let id = format!("web.{n}");
        let node = format!("node{n}");
        cli(&bin, dir, 3, &["task", "attach", "--service", "web", "--node", &node, "--netns", &tns, "--id", &id])?;
    }
    // Each node makes its task's port when its tables arrive.
    for n in 1..=NODES {
        let tns = ns_name(&format!("t{n}"));
        wait(&format!("web.{n}'s interface in {tns} (see {}/node{n}.log)", dir.display()), 20, || {
            Cmd::new("ip")
                .args(["-n", &tns, "-4", "route", "show", "default"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        })?;
        spawn(
            dir,
            &tns,
            &format!("web.{n}.log"),
            &[&bin, "tool", "http-name", "--listen", "0.0.0.0:8080", "--name", &format!("web.{n}")],
        )?;
    }
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
        "lab up: {NODES} nodes (198.18.0.1-{NODES}, {} I/O; managers, Raft and gossip on 198.18.1.0/24), client {CLIENT_IP}, service web published on every node at 30080 (nat) and 30081 (preserve-source), tasks {}",
        if io == IoKind::Tap { "TAP" } else { "AF_XDP" },
        tasks.join(", ")
    );
    println!(
        "the CLI on the lab: meshplane --state-dir {}/node1 node ls (or service ls, task ls, lb ls, stats)",
        dir.display()
    );
    println!("next: meshplane lab demo; meshplane lab down");
    Ok(())
}

/// The pid of node `n`'s process, from the lab's pid list (the last one
/// started).
fn node_pid(dir: &Path, n: u8) -> Option<String> {
    let pids = std::fs::read_to_string(dir.join("pids")).ok()?;
    let log = format!("node{n}.log");
    pids.lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some(log.as_str()))?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// Moves node `n`'s uplink TAP device (which its process made in its
/// namespace) onto the fabric's bridge.
fn attach_tap_uplink(n: u8) -> Result<()> {
    let (ns, fab) = (ns_name(&format!("n{n}")), ns_name("fab"));
    ip(&format!("-n {ns} link set mpup netns {fab}"))?;
    ip(&format!("-n {fab} link set mpup name u{n}"))?;
    ip(&format!("-n {fab} link set u{n} master br0 up"))
}

fn stop_node(n: u8, kill: bool, dir: &Path) -> Result<()> {
    let pid = node_pid(dir, n).with_context(|| format!("no node{n} in {}/pids", dir.display()))?;
    let sig = if kill { "-KILL" } else { "-TERM" };
    sh(&["kill", sig, &pid])?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    wait(&format!("node{n} (pid {pid}) to end"), 10, || !proc.exists())?;
    println!("node{n} stopped ({})", if kill { "SIGKILL: as if it crashed" } else { "SIGTERM" });
    Ok(())
}

fn start_node(n: u8, dir: &Path) -> Result<()> {
    if let Some(pid) = node_pid(dir, n)
        && Path::new(&format!("/proc/{pid}")).exists()
    {
        bail!("node{n} runs already (pid {pid})");
    }
    let args = std::fs::read_to_string(dir.join(format!("node{n}.args")))
        .with_context(|| format!("node{n} was not started by this lab ({})", dir.display()))?;
    let args: Vec<&str> = args.lines().collect();
    let sock = dir.join(format!("node{n}")).join("admin.sock");
    let _ = std::fs::remove_file(&sock);
    spawn(dir, &ns_name(&format!("n{n}")), &format!("node{n}.log"), &args)?;
    wait(&format!("node{n} to start (see {}/node{n}.log)", dir.display()), 20, || sock.exists())?;
    if std::fs::read_to_string(dir.join("io")).is_ok_and(|s| s == "tap") {
        // The node made its uplink TAP anew: onto the fabric with it.
        attach_tap_uplink(n)?;
    }
    println!("node{n} started again (from its state directory)");
    Ok(())
}

fn lab_namespaces() -> Result<impl Iterator<Item = String>> {
    let out = Cmd::new("ip").args(["netns", "list"]).output().context("running ip netns list")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with(PREFIX))
        .collect::<Vec<_>>()
        .into_iter())
}

fn down(dir: &Path) -> Result<()> {
    // Stop what the lab started, by pid, then whatever still runs in its
    // namespaces (after a crash the pid file may be gone).
    let mut stopped = 0;
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.split_whitespace().next()) {
            if Cmd::new("kill").args(["-TERM", pid]).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                stopped += 1;
            }
        }
    }
    for ns in lab_namespaces()? {
        if let Ok(out) = Cmd::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Cmd::new("kill").args(["-TERM", pid]).stderr(Stdio::null()).status();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut removed = 0;
    for ns in lab_namespaces()? {
        if Cmd::new("ip").args(["netns", "del", &ns]).status().is_ok_and(|s| s.success()) {
            removed += 1;
        }
    }
    let _ = std::fs::remove_file(dir.join("pids"));
    println!("lab down: {stopped} processes stopped, {removed} namespaces removed");
    Ok(())
}

/// One node's counters from its stats file: frames in, out, dropped, new
/// connections.
fn counters(dir: &Path, n: u8) -> Option<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(dir.join(format!("stats{n}.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (mut rx, mut tx, mut drops, mut conns) = (0, 0, 0, 0);
    for w in v["workers"].as_array()? {
        for p in w["ports"].as_array()? {
            rx += p["rx"].as_u64().unwrap_or(0);
            tx += p["tx"].as_u64().unwrap_or(0);
        }
        drops += w["drops"].as_object().map_or(0, |d| d.values().filter_map(|x| x.as_u64()).sum());
        conns += w["new_connections"].as_u64().unwrap_or(0);
    }
    Some((rx, tx, drops, conns))
}

fn status(dir: &Path) -> Result<()> {
    let names: Vec<String> = lab_namespaces()?.collect();
    if names.is_empty() {
        println!("lab: not up");
        return Ok(());
    }
    println!("lab: {} namespaces ({})", names.len(), names.join(" "));
    for n in 1..=NODES {
        match counters(dir, n) {
            Some((rx, tx, d, c)) => {
                println!("  node{n} 198.18.0.{n}: {rx} frames in, {tx} out, {d} dropped, {c} connections balanced")
            }
            None => println!("  node{n}: no counters (see {}/node{n}.log)", dir.display()),
        }
    }
    Ok(())
}

fn demo(requests: u32, dir: &Path) -> Result<()> {
    let client = ns_name("c");
    if !lab_namespaces()?.any(|n| n == client) {
        bail!("the lab is not up: `meshplane lab up` first");
    }
    let bin = std::env::current_exe()?.display().to_string();
    let state = cluster_state(&bin, dir, 1)?;
    let node_addr = |ip: &str| {
        let app = state["networks"]["app"]["node_ips"].as_object()?;
        app.iter().find(|(_, a)| a.as_str() == Some(ip)).map(|(n, _)| format!("{n}'s address in the network"))
    };
    println!("meshplane lab demo: client {CLIENT_IP} -> every node's published ports, {requests} requests each\n");
    println!("  {:<17} {:<16} {:<12} task saw the client as", "via node", "mode", "answered by");
    let (mut ok, mut failed) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    let mut ps_all_real = true;
    for n in 1..=NODES {
        for (port, mode) in [(30080, "nat"), (30081, "preserve-source")] {
            for _ in 0..requests {
                let url = format!("http://198.18.0.{n}:{port}/");
                let out = Cmd::new("ip")
                    .args(["netns", "exec", &client, &bin, "tool", "http-get", "--url", &url, "--timeout", "5"])
                    .output()?;
                let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !out.status.success() || body.is_empty() {
                    failed += 1;
                    println!(
                        "  198.18.0.{n}:{port:<6} {mode:<16} FAILED: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    continue;
                }
                ok += 1;
                // "web.2 saw 198.19.0.5:40001"
                let (who, saw) = body.split_once(" saw ").unwrap_or((&body, "?"));
                let saw_ip = saw.split(':').next().unwrap_or("?");
                answered.insert(who.to_owned());
                let note = if saw_ip == CLIENT_IP {
                    "(the client's own address)".to_owned()
                } else {
                    node_addr(saw_ip).map(|s| format!("({s})")).unwrap_or_default()
                };
                if mode == "preserve-source" && saw_ip != CLIENT_IP {
                    ps_all_real = false;
                }
                println!("  198.18.0.{n}:{port:<6} {mode:<16} {who:<12} {saw:<24} {note}");
            }
        }
    }
    // The nodes write their counters every half second.
    std::thread::sleep(Duration::from_millis(1200));
    println!("\nper node (counters of the dataplane):");
    for n in 1..=NODES {
        if let Some((rx, tx, d, c)) = counters(dir, n) {
            println!("  node{n}: {rx} frames in, {tx} out, {d} dropped, {c} connections balanced");
        }
    }
    let tasks = state["tasks"].as_array().map_or(0, Vec::len);
    println!(
        "\nsummary: {ok} of {} requests answered; {} of {tasks} tasks answered; preserve-source: {}",
        ok + failed,
        answered.len(),
        if ps_all_real { "every task saw the client's own address" } else { "a task did NOT see the client's address" }
    );
    if failed > 0 || answered.len() < tasks || !ps_all_real {
        bail!("the demo did not go as it should (see above)");
    }
    Ok(())
}
