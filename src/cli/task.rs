//! `meshplane task attach|ls|drain|detach`.

use super::args::{Conn, TaskCmd};
use super::client::{call, state, write};
use super::render::{print, s, table};
use anyhow::{Result, anyhow, bail};
use meshplane_control::cluster::AdminRequest;
use meshplane_control::state::{Command, ContainerRef, TaskHealth, TaskNetns};
use serde_json::Value;

/// Runs a `task` command.
pub(crate) fn run(c: &Conn, cmd: &TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::Attach { service, node, netns, pid, container, weight, id } => {
            let me = this_node(c)?;
            let node = node.clone().unwrap_or_else(|| me.clone());
            let (netns, container) = match pid {
                Some(pid) => {
                    if node != me {
                        bail!("--pid names a process on this machine: attach it on its own node (this is {me})");
                    }
                    let (netns, c) = by_pid(*pid, container.as_deref())?;
                    (Some(netns), Some(c))
                }
                None => {
                    if node == me
                        && let Some(n) = netns
                    {
                        check_namespace_file(n)?;
                    }
                    let c = container.as_ref().map(|id| ContainerRef {
                        id: id.clone(),
                        cni: None,
                        netns_ino: netns.as_deref().and_then(|n| ino(&TaskNetns::parse(n).ok()?.path())),
                        name: None,
                    });
                    (netns.clone(), c)
                }
            };
            attach(c, service, &node, &netns, *weight, id.as_deref(), container)?
        }
        TaskCmd::Ls { service } => {
            let st = state(c)?;
            let tasks: Vec<Value> = st["tasks"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, t)| t.clone())
                .filter(|t| service.as_ref().is_none_or(|sv| t["service"] == Value::String(sv.clone())))
                .collect();
            // Where each task is published in host mode: its node's data
            // address, the port, the target port (Swarm's `PORTS`).
            let tasks: Vec<Value> = tasks
                .into_iter()
                .map(|mut t| {
                    let sv = &st["services"][s(&t["service"])];
                    let at = s(&st["nodes"][s(&t["node"])]["data_ip"]);
                    let published: Vec<Value> = sv["published"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["mode"] == "host")
                        .map(|p| Value::String(format!("{at}:{}->{}", s(&p["port"]), s(&sv["target_port"]))))
                        .collect();
                    t["published"] = Value::Array(published);
                    t
                })
                .collect();
            print(c, &Value::Array(tasks), |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let published: Vec<String> = t["published"].as_array().into_iter().flatten().map(s).collect();
                        let published = if published.is_empty() { "-".to_owned() } else { published.join(" ") };
                        vec![
                            s(&t["id"]),
                            s(&t["service"]),
                            s(&t["node"]),
                            s(&t["ip"]),
                            s(&t["weight"]),
                            health_cell(&t["health"]),
                            s(&t["netns"]),
                            container_cell(&t["container"]),
                            published,
                        ]
                    })
                    .collect();
                #[rustfmt::skip]
                table(&["ID", "SERVICE", "NODE", "ADDRESS", "WEIGHT", "HEALTH", "NETNS", "CONTAINER", "PUBLISHED"], rows);
            });
        }
        TaskCmd::Drain { id } => {
            write(c, Command::SetWeight { id: id.clone(), weight: 0 })?;
            println!("{id}");
        }
        TaskCmd::Detach { id, container } => {
            let id = match (id, container) {
                (Some(id), _) => id.clone(),
                (None, Some(prefix)) => of_container(&state(c)?, prefix)?,
                (None, None) => bail!("task detach: give a task id or --container"),
            };
            write(c, Command::DetachTask { id: id.clone() })?;
            println!("{id}");
        }
    }
    Ok(())
}

/// A task's health as `task ls` shows it: starting, healthy, unhealthy,
/// or `-` for a task that is not checked (and a state without the field).
fn health_cell(v: &Value) -> String {
    serde_json::from_value::<TaskHealth>(v.clone()).unwrap_or_default().name().to_owned()
}

/// The node the CLI talks to.
fn this_node(c: &Conn) -> Result<String> {
    let info = call(c, AdminRequest::Info)?;
    info["node"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("the node did not say its name"))
}

/// `--netns` given as a path, for a task on this machine: it must be a
/// network namespace (a file of nsfs), not any file (the state takes any
/// path: only its node can tell).
fn check_namespace_file(netns: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(TaskNetns::File(path)) = TaskNetns::parse(netns) else { return Ok(()) };
    let dev = |p: &str| std::fs::metadata(p).map(|m| m.dev());
    match (dev(&path), dev("/proc/self/ns/net")) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Ok(_), Ok(_)) => bail!(
            "--netns {path}: not a network namespace (a name from ip netns, /proc/PID/ns/net, or a runtime's bind mount of one)"
        ),
        (Err(e), _) => bail!("--netns {path}: {e}"),
        (_, Err(e)) => bail!("reading this process's network namespace: {e}"),
    }
}

/// The inode of namespace file `path`.
fn ino(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// `--pid PID`: its namespace and the container it is (`--container`, or
/// the id in its cgroup, or `pid-PID`), with the namespace's inode.
fn by_pid(pid: u32, container: Option<&str>) -> Result<(String, ContainerRef)> {
    let netns = format!("/proc/{pid}/ns/net");
    let ino = ino(&netns).ok_or_else(|| anyhow!("--pid {pid}: no such process (or its namespace cannot be read)"))?;
    let id = match container {
        Some(id) => id.to_owned(),
        None => std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|c| cgroup_container(&c))
            .unwrap_or_else(|| format!("pid-{pid}")),
    };
    Ok((netns, ContainerRef { id, cni: None, netns_ino: Some(ino), name: None }))
}

/// The container id in a process's `/proc/PID/cgroup`: the last path
/// component of 64 hex digits, after an optional `docker-`, `libpod-` or
/// `cri-containerd-` and before an optional `.scope` (Docker and podman
/// with cgroupfs or systemd).
fn cgroup_container(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|l| {
        let last = l.rsplit('/').next()?;
        let last = last.strip_suffix(".scope").unwrap_or(last);
        let id = ["docker-", "libpod-", "cri-containerd-"].iter().find_map(|p| last.strip_prefix(p)).unwrap_or(last);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

/// The task whose container id is `prefix`, or the one task whose
/// container id starts with it (at least 4 characters).
fn of_container(st: &Value, prefix: &str) -> Result<String> {
    let tasks: Vec<(String, String)> = st["tasks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(id, t)| Some((id.clone(), t["container"]["id"].as_str()?.to_owned())))
        .collect();
    if let Some((id, _)) = tasks.iter().find(|(_, c)| c == prefix) {
        return Ok(id.clone());
    }
    if prefix.len() < 4 {
        bail!("--container {prefix:?}: give the whole id, or at least 4 characters of it");
    }
    let found: Vec<&(String, String)> = tasks.iter().filter(|(_, c)| c.starts_with(prefix)).collect();
    match found.as_slice() {
        [] => bail!("no task of container {prefix}"),
        [(id, _)] => Ok(id.clone()),
        many => {
            let list: Vec<String> = many.iter().map(|(id, c)| format!("{id} ({})", short(c))).collect();
            bail!("container prefix {prefix} matches tasks {}: give more of it", list.join(", "))
        }
    }
}

/// The first 12 characters of a container id (as `docker ps` shows it).
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// `task ls`'s CONTAINER cell.
fn container_cell(v: &Value) -> String {
    v["id"].as_str().map_or_else(|| "-".to_owned(), |id| short(id).to_owned())
}

/// `task attach`: the task (its id SERVICE.N unless given), then its
/// address once this node's state has it.
fn attach(
    c: &Conn,
    service: &str,
    node: &str,
    netns: &Option<String>,
    weight: u32,
    id: Option<&str>,
    container: Option<ContainerRef>,
) -> Result<()> {
    // The namespace checked here as every manager checks it (a clear
    // message before anything is sent), sent in its normalised form.
    let netns = match netns {
        Some(n) => Some(TaskNetns::parse(n).map_err(|e| anyhow!("--netns: {e}"))?.to_string()),
        None => None,
    };
    // Without --id: SERVICE.N, the lowest N free. This node's copy
    // of the state may lag the leader's: an id taken meanwhile is
    // skipped and the next one tried.
    let mut tried = std::collections::BTreeSet::new();
    let id = loop {
        let tid = match id {
            Some(i) => i.to_owned(),
            None => {
                let st = state(c)?;
                let free = |i: &String| st["tasks"].get(i).is_none() && !tried.contains(i);
                (1..).map(|n| format!("{service}.{n}")).find(free).unwrap_or_default()
            }
        };
        let cmd = Command::AttachTask {
            id: tid.clone(),
            service: service.to_owned(),
            node: node.to_owned(),
            weight,
            netns: netns.clone(),
            container: container.clone(),
        };
        match write(c, cmd) {
            Ok(()) => break tid,
            Err(e) if id.is_none() && tried.len() < 8 && e.to_string().contains("already exists") => {
                tried.insert(tid);
            }
            Err(e) => return Err(e),
        }
    };
    // The address, once this node's copy of the state has the task; the
    // resolver is the network's gateway (the node's embedded DNS).
    let t0 = std::time::Instant::now();
    let (ip, gateway) = loop {
        let st = state(c)?;
        if let Some(ip) = st["tasks"][&id]["ip"].as_str() {
            let network = &st["services"][service]["network"];
            let gw = network.as_str().and_then(|n| st["networks"][n]["gateway"].as_str()).map(str::to_owned);
            break (ip.to_owned(), gw);
        }
        if t0.elapsed() > std::time::Duration::from_secs(3) {
            break ("(address not known here yet)".to_owned(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let of = container.as_ref().map(|c| format!(" (container {})", short(&c.id))).unwrap_or_default();
    print(c, &attached(&id, &ip, node, gateway.as_deref()), |_| match &gateway {
        Some(gw) => println!("{id}: {ip} on {node}, DNS {gw}{of}"),
        None => println!("{id}: {ip} on {node}{of}"),
    });
    Ok(())
}

/// What `task attach --format json` prints: the task, and its DNS in the
/// shape of a CNI result's `dns`.
fn attached(id: &str, ip: &str, node: &str, gateway: Option<&str>) -> Value {
    let mut v = serde_json::json!({ "id": id, "ip": ip, "node": node });
    if let Some(gw) = gateway {
        v["dns"] = serde_json::json!({ "nameservers": [gw], "options": ["ndots:0"] });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_json_carries_the_dns_as_cni_does() {
        let v = attached("web.1", "198.19.0.5", "node1", Some("198.19.0.254"));
        assert_eq!(
            v,
            serde_json::json!({ "id": "web.1", "ip": "198.19.0.5", "node": "node1",
                "dns": { "nameservers": ["198.19.0.254"], "options": ["ndots:0"] } })
        );
        assert!(attached("web.1", "?", "node1", None).get("dns").is_none());
    }

    #[test]
    fn container_ids_come_from_docker_and_podman_cgroups() {
        let id = "3f2a9c1b7d4e".repeat(5) + "abcd";
        assert_eq!(id.len(), 64);
        for cg in [
            format!("12:pids:/docker/{id}\n0::/docker/{id}\n"),
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n1:cpu:/libpod_parent/libpod-{id}\n"),
            format!("0::/kubepods/burstable/pod1/cri-containerd-{id}.scope\n"),
        ] {
            assert_eq!(cgroup_container(&cg).as_deref(), Some(id.as_str()), "{cg}");
        }
        for none in ["0::/user.slice/user-0.slice/session-1.scope\n", "0::/\n", "", "0::/docker/abc\n"] {
            assert_eq!(cgroup_container(none), None, "{none}");
        }
    }

    #[test]
    fn a_container_prefix_names_one_task() {
        let st = serde_json::json!({ "tasks": {
            "web.1": { "container": { "id": "3f2a9c1b7d4e" } },
            "web.2": { "container": { "id": "3f2a01ffffff" } },
            "web.3": { "netns": "mp-t3" },
            "web.4": { "container": { "id": "abc" } },
        }});
        assert_eq!(of_container(&st, "3f2a9c").expect("one"), "web.1");
        assert_eq!(of_container(&st, "abc").expect("the whole id"), "web.4");
        let e = of_container(&st, "3f2a").expect_err("two").to_string();
        assert!(e.contains("matches tasks web.1 (3f2a9c1b7d4e), web.2 (3f2a01ffffff)"), "{e}");
        let e = of_container(&st, "ffff").expect_err("none").to_string();
        assert_eq!(e, "no task of container ffff");
        let e = of_container(&st, "3f").expect_err("short").to_string();
        assert!(e.contains("at least 4"), "{e}");
        assert_eq!(container_cell(&st["tasks"]["web.3"]["container"]), "-");
        assert_eq!(container_cell(&serde_json::json!({ "id": "0123456789abcdef" })), "0123456789ab");
    }
}
