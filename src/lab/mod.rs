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

mod demo;
mod up;

use crate::sys::{self, ip};

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
        LabCommand::Up { io, dir } => up::up(*io, dir),
        LabCommand::Status { dir } => demo::status(dir),
        LabCommand::Demo { requests, dir } => demo::demo(*requests, dir),
        LabCommand::Down { dir } => down(dir),
        LabCommand::StopNode { node, kill, dir } => stop_node(*node, *kill, dir),
        LabCommand::StartNode { node, dir } => start_node(*node, dir),
    }
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
    ip(&["-n", &ns, "link", "set", "mpup", "netns", &fab])?;
    ip(&["-n", &fab, "link", "set", "mpup", "name", &format!("u{n}")])?;
    ip(&["-n", &fab, "link", "set", &format!("u{n}"), "master", "br0", "up"])
}

fn stop_node(n: u8, kill: bool, dir: &Path) -> Result<()> {
    let pid = node_pid(dir, n).with_context(|| format!("no node{n} in {}/pids", dir.display()))?;
    let sig = if kill { "-KILL" } else { "-TERM" };
    sys::run("kill", &[sig, &pid])?;
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
    let text = sys::output("ip", &["netns", "list"])?;
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
            if sys::kill("-TERM", pid) {
                stopped += 1;
            }
        }
    }
    for ns in lab_namespaces()? {
        if let Ok(out) = sys::output("ip", &["netns", "pids", &ns]) {
            for pid in out.split_whitespace() {
                sys::kill("-TERM", pid);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut removed = 0;
    for ns in lab_namespaces()? {
        if ip(&["netns", "del", &ns]).is_ok() {
            removed += 1;
        }
    }
    let _ = std::fs::remove_file(dir.join("pids"));
    println!("lab down: {stopped} processes stopped, {removed} namespaces removed");
    Ok(())
}
