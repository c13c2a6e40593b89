//! What the lab's commands share: its names and addresses, starting a
//! process in a namespace, the CLI against a node, waiting.

use crate::sys;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command as Cmd, Stdio};
use std::time::{Duration, Instant};

/// The prefix of the lab's namespaces.
pub(super) const PREFIX: &str = "mp-lab-";
/// Its nodes.
pub(super) const NODES: u8 = 3;
/// The client's address on the underlay.
pub(super) const CLIENT_IP: &str = "198.18.0.100";
/// The underlay's router (the fabric namespace, forwarding), every node's
/// default route.
pub(super) const ROUTER_IP: &str = "198.18.0.254";
/// The "outside world" behind the router: a server tasks reach by egress.
pub(super) const OUTSIDE_IP: &str = "198.18.2.10";
/// Its port.
pub(super) const OUTSIDE_PORT: u16 = 8080;

/// The lab's namespace `s`.
pub(super) fn ns_name(s: &str) -> String {
    format!("{PREFIX}{s}")
}

/// Starts `args` in `ns`, detached, output to `log`; writes its pid into
/// the lab's pid list.
pub(super) fn spawn(dir: &Path, ns: &str, log: &str, args: &[&str]) -> Result<u32> {
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
pub(super) fn cli(bin: &str, dir: &Path, n: u8, args: &[&str]) -> Result<String> {
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
pub(super) fn cluster_state(bin: &str, dir: &Path, n: u8) -> Result<serde_json::Value> {
    let out = cli(bin, dir, n, &["network", "ls", "--format", "json"])?;
    let networks: serde_json::Value = serde_json::from_str(&out)?;
    let out = cli(bin, dir, n, &["task", "ls", "--format", "json"])?;
    let tasks: serde_json::Value = serde_json::from_str(&out)?;
    Ok(serde_json::json!({ "networks": networks, "tasks": tasks }))
}

/// Waits up to `secs` seconds for `cond`.
pub(super) fn wait(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Result<()> {
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
pub(super) fn node_pid(dir: &Path, n: u8) -> Option<String> {
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
pub(super) fn attach_tap_uplink(n: u8) -> Result<()> {
    let (ns, fab) = (ns_name(&format!("n{n}")), ns_name("fab"));
    sys::ip(&["-n", &ns, "link", "set", "mpup", "netns", &fab])?;
    sys::ip(&["-n", &fab, "link", "set", "mpup", "name", &format!("u{n}")])?;
    sys::ip(&["-n", &fab, "link", "set", &format!("u{n}"), "master", "br0", "up"])
}

/// The lab's namespaces (also those of a lab that crashed).
pub(super) fn lab_namespaces() -> Result<impl Iterator<Item = String>> {
    let text = sys::output("ip", &["netns", "list"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with(PREFIX))
        .collect::<Vec<_>>()
        .into_iter())
}
