//! `meshplane lab stop-node|start-node|down`.

use super::common::{attach_tap_uplink, lab_namespaces, node_pid, ns_name, spawn, wait};
use super::podman::Podman;
use crate::sys::{self, ip};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Stops node `n`'s process (SIGKILL with `kill`: as if it crashed).
pub(super) fn stop_node(n: u8, kill: bool, dir: &Path) -> Result<()> {
    let pid = node_pid(dir, n).with_context(|| format!("no node{n} in {}/pids", dir.display()))?;
    let sig = if kill { "-KILL" } else { "-TERM" };
    sys::run("kill", &[sig, &pid])?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    wait(&format!("node{n} (pid {pid}) to end"), 10, || !proc.exists())?;
    println!("node{n} stopped ({})", if kill { "SIGKILL: as if it crashed" } else { "SIGTERM" });
    Ok(())
}

/// Starts node `n` again with the arguments it was first started with.
pub(super) fn start_node(n: u8, dir: &Path) -> Result<()> {
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

/// Stops everything and removes the namespaces (also after a crash).
pub(super) fn down(dir: &Path) -> Result<()> {
    // podman's containers first, while the nodes run: each one's DEL
    // reaches its node. Whatever happens, the rest goes too.
    let containers = Podman::of(dir).down();
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
    let containers = containers.context("removing the lab's podman containers")?;
    let containers = if containers > 0 { format!(", {containers} podman containers removed") } else { String::new() };
    println!("lab down: {stopped} processes stopped, {removed} namespaces removed{containers}");
    Ok(())
}
