//! `meshplane lab status` and `meshplane lab demo`: what runs, and
//! requests through the routing mesh with who answered them.

use super::common::{CLIENT_IP, NODES, OUTSIDE_IP, OUTSIDE_PORT, cluster_state, lab_namespaces, ns_name};
use super::podman::{Podman, output_within};
use crate::stats::NodeStats;
use anyhow::{Result, bail};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command as Cmd;
use std::time::Duration;

/// One node's counters from its stats file: frames in, out, dropped, new
/// connections.
fn counters(dir: &Path, n: u8) -> Option<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(dir.join(format!("stats{n}.json"))).ok()?;
    let v: NodeStats = serde_json::from_str(&text).ok()?;
    let (mut rx, mut tx, mut drops, mut conns) = (0, 0, 0, 0);
    for w in &v.workers {
        for p in &w.ports {
            rx += p.rx;
            tx += p.tx;
        }
        drops += w.drops.values().sum::<u64>();
        conns += w.new_connections;
    }
    Some((rx, tx, drops, conns))
}

/// Shows what runs and the nodes' counters.
pub(super) fn status(dir: &Path) -> Result<()> {
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
    let pm = Podman::of(dir);
    if pm.exists() {
        match pm.ps() {
            Ok(ps) => {
                for c in pm.containers() {
                    let st = ps.iter().find(|(n, _)| *n == c.name).map_or("gone", |(_, s)| s.as_str());
                    let short = c.id.get(..12).unwrap_or(&c.id);
                    println!("  {} podman container {} ({short}): {st}", c.task, c.name);
                }
            }
            Err(e) => println!("  podman containers: {e}"),
        }
    }
    Ok(())
}

/// What the demo's requests came to.
#[derive(Default)]
struct Outcome {
    ok: u32,
    failed: u32,
    answered: BTreeSet<String>,
    ps_all_real: bool,
}

/// Sends requests through the routing mesh to every node's published
/// ports, in both modes, and prints who answered and what they saw.
pub(super) fn demo(requests: u32, dir: &Path) -> Result<()> {
    let client = ns_name("c");
    if !lab_namespaces()?.any(|n| n == client) {
        bail!("the lab is not up: `meshplane lab up` first");
    }
    let bin = std::env::current_exe()?.display().to_string();
    let mut state = cluster_state(&bin, dir, 1)?;
    // The routing mesh and egress rows are web's tasks' (api's task is
    // called by name below).
    let web: Vec<serde_json::Value> =
        state["tasks"].as_array().into_iter().flatten().filter(|t| t["service"] == "web").cloned().collect();
    state["tasks"] = serde_json::Value::Array(web);
    println!("meshplane lab demo: client {CLIENT_IP} -> every node's published ports, {requests} requests each\n");
    println!("  {:<17} {:<16} {:<12} task saw the client as", "via node", "mode", "answered by");
    let out = send(&bin, &client, requests, &state)?;
    println!("\ntasks -> the outside server {OUTSIDE_IP}:{OUTSIDE_PORT} (egress through their own node):\n");
    println!("  {:<8} {:<8} {:<12} the outside saw", "task", "on", "answered by");
    let egress_ok = egress(dir, &bin, &state);
    println!("\ntasks -> the service api by name (the embedded DNS at their gateway, then api's VIP):\n");
    println!("  {:<8} {:<8} {:<26} answered by", "task", "on", "api resolved to");
    let names_ok = by_name(dir, &bin, &state);
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
        "\nsummary: {} of {} requests answered; {} of {tasks} tasks answered; preserve-source: {}; egress: {}; by name: {}",
        out.ok,
        out.ok + out.failed,
        out.answered.len(),
        if out.ps_all_real {
            "every task saw the client's own address"
        } else {
            "a task did NOT see the client's address"
        },
        if egress_ok {
            "every task reached the outside from its node's address"
        } else {
            "a task did NOT reach the outside from its node's address"
        },
        if names_ok { "every task reached api by its name" } else { "a task did NOT reach api by its name" }
    );
    if out.failed > 0 || out.answered.len() < tasks || !out.ps_all_real || !egress_ok || !names_ok {
        bail!("the demo did not go as it should (see above)");
    }
    Ok(())
}

/// How the demo runs a program inside task `t`: `ip netns exec mp-lab-tN`
/// for a task in a namespace of the lab's, `podman exec mp-lab-web-N` (with
/// the lab's podman configuration) for one of the lab's containers (as
/// recorded in `DIR/podman`); whether it is a container, whose programs
/// are its busybox's (the host's would read the host's resolv.conf, not
/// the container's).
fn in_task(dir: &Path, t: &serde_json::Value) -> (Cmd, bool) {
    let id = t["id"].as_str().unwrap_or("?");
    let pm = Podman::of(dir);
    match pm.containers().into_iter().find(|c| c.task == id).map(|c| c.name) {
        Some(name) => (pm.cmd(&["exec", &name]), true),
        None => {
            let node = t["node"].as_str().unwrap_or("?");
            let tns = ns_name(&format!("t{}", node.trim_start_matches("node")));
            let mut c = Cmd::new("ip");
            c.args(["netns", "exec", &tns]);
            (c, false)
        }
    }
}

/// GET `url` from inside task `t` (5 s at most): the body, or what went
/// wrong. In a namespace, `tool http-get` (`http://IP:PORT/` only) or,
/// for a URL with a name (`by_name`), curl (libc's resolver).
fn get_in(dir: &Path, bin: &str, t: &serde_json::Value, url: &str, by_name: bool) -> Result<String, String> {
    let (mut c, container) = in_task(dir, t);
    if container {
        // busybox's wget -T crashes: its own timeout instead.
        c.args(["timeout", "5", "wget", "-qO-", url]);
    } else if by_name {
        c.args(["curl", "-sf", "--max-time", "5", url]);
    } else {
        c.args([bin, "tool", "http-get", "--url", url, "--timeout", "5"]);
    }
    match output_within(&mut c, 15) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            let line = err.lines().find(|l| l.starts_with("Error")).or_else(|| err.lines().find(|l| !l.is_empty()));
            Err(line.unwrap_or("").trim().to_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `name`'s address as task `t`'s resolver has it (`getent hosts`: libc's
/// resolver, the namespace's resolv.conf; in a container busybox's
/// `nslookup`, its resolv.conf).
fn resolve_in(dir: &Path, t: &serde_json::Value, name: &str) -> Option<String> {
    let (mut c, container) = in_task(dir, t);
    if container {
        c.args(["timeout", "5", "nslookup", name]);
    } else {
        c.args(["getent", "hosts", name]);
    }
    let o = output_within(&mut c, 15).ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    if container {
        nslookup_address(&text)
    } else if o.status.success() {
        text.split_whitespace().next().map(str::to_owned)
    } else {
        None
    }
}

/// The first IPv4 address busybox's `nslookup` printed for the name (the
/// `Address` lines after `Name:`; those before it are the server's).
fn nslookup_address(text: &str) -> Option<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter(|l| l.starts_with("Address"))
        .filter_map(|l| l.split_whitespace().last())
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
}

/// From every task, api's address by name and `http://api:8080/`, which
/// api.1 must answer; one line printed each.
fn by_name(dir: &Path, bin: &str, state: &serde_json::Value) -> bool {
    let mut all = true;
    for t in state["tasks"].as_array().into_iter().flatten() {
        let (id, node) = (t["id"].as_str().unwrap_or("?"), t["node"].as_str().unwrap_or("?"));
        let resolved = resolve_in(dir, t, "api");
        let body = if resolved.is_some() { get_in(dir, bin, t, "http://api:8080/", true).ok() } else { None };
        let who = body.as_deref().and_then(|b| b.split_once(" saw ")).map(|(w, _)| w.to_owned());
        let ok = resolved.is_some() && who.as_deref() == Some("api.1");
        all &= ok;
        let resolved = resolved.map_or_else(|| "FAILED (no answer)".to_owned(), |a| format!("{a} (api's VIP)"));
        println!("  {id:<8} {node:<8} {resolved:<26} {}", who.as_deref().unwrap_or("FAILED"));
    }
    all
}

/// From every task, a request to the outside server, which must answer
/// and have seen the task's node's data address; one line printed each.
fn egress(dir: &Path, bin: &str, state: &serde_json::Value) -> bool {
    let mut all = true;
    for t in state["tasks"].as_array().into_iter().flatten() {
        let (id, node) = (t["id"].as_str().unwrap_or("?"), t["node"].as_str().unwrap_or("?"));
        let n = node.trim_start_matches("node");
        let url = format!("http://{OUTSIDE_IP}:{OUTSIDE_PORT}/");
        let out = get_in(dir, bin, t, &url, false);
        let body = out.clone().unwrap_or_default();
        let (who, saw) = body.split_once(" saw ").unwrap_or(("-", "-"));
        let node_ip = format!("198.18.0.{n}");
        let ok = out.is_ok() && saw.split(':').next() == Some(node_ip.as_str());
        all &= ok;
        let note = match &out {
            _ if ok => format!("({node}'s data address)"),
            Err(e) => format!("FAILED {e}"),
            Ok(_) => "FAILED".to_owned(),
        };
        println!("  {id:<8} {node:<8} {who:<12} {saw:<22} {note}");
    }
    all
}

/// The requests, one line printed for each.
fn send(bin: &str, client: &str, requests: u32, state: &serde_json::Value) -> Result<Outcome> {
    let node_addr = |ip: &str| {
        let app = state["networks"]["app"]["node_ips"].as_object()?;
        app.iter().find(|(_, a)| a.as_str() == Some(ip)).map(|(n, _)| format!("{n}'s address in the network"))
    };
    let mut o = Outcome { ps_all_real: true, ..Outcome::default() };
    for n in 1..=NODES {
        for (port, mode) in [(30080, "nat"), (30081, "preserve-source")] {
            for _ in 0..requests {
                let url = format!("http://198.18.0.{n}:{port}/");
                let out = Cmd::new("ip")
                    .args(["netns", "exec", client, bin, "tool", "http-get", "--url", &url, "--timeout", "5"])
                    .output()?;
                let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !out.status.success() || body.is_empty() {
                    o.failed += 1;
                    println!(
                        "  198.18.0.{n}:{port:<6} {mode:<16} FAILED: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    continue;
                }
                o.ok += 1;
                // "web.2 saw 198.19.0.5:40001"
                let (who, saw) = body.split_once(" saw ").unwrap_or((&body, "?"));
                let saw_ip = saw.split(':').next().unwrap_or("?");
                o.answered.insert(who.to_owned());
                let note = if saw_ip == CLIENT_IP {
                    "(the client's own address)".to_owned()
                } else {
                    node_addr(saw_ip).map(|s| format!("({s})")).unwrap_or_default()
                };
                if mode == "preserve-source" && saw_ip != CLIENT_IP {
                    o.ps_all_real = false;
                }
                println!("  198.18.0.{n}:{port:<6} {mode:<16} {who:<12} {saw:<24} {note}");
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::nslookup_address;

    #[test]
    fn nslookup_address_is_the_names_not_the_servers() {
        let text = "Server:\t\t198.19.0.254\nAddress:\t198.19.0.254:53\n\nName:\tapi\nAddress: 198.19.0.8\n\n";
        assert_eq!(nslookup_address(text).as_deref(), Some("198.19.0.8"));
        let v6_first = "Server: 198.19.0.254\nAddress: 198.19.0.254:53\n\nName: api\nAddress: fd00::8\nName: api\nAddress 1: 198.19.0.9\n";
        assert_eq!(nslookup_address(v6_first).as_deref(), Some("198.19.0.9"));
        let none = "Server:\t\t198.19.0.254\nAddress:\t198.19.0.254:53\n\n** server can't find api: NXDOMAIN\n";
        assert_eq!(nslookup_address(none), None);
        assert_eq!(nslookup_address(""), None);
    }
}
