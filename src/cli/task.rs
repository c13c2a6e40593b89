//! `meshplane task attach|ls|drain|detach`.

use super::args::{Conn, TaskCmd};
use super::client::{state, write};
use super::render::{print, s, table};
use anyhow::{Result, anyhow};
use meshplane_control::state::{Command, TaskHealth, TaskNetns};
use serde_json::Value;

/// Runs a `task` command.
pub(crate) fn run(c: &Conn, cmd: &TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::Attach { service, node, netns, weight, id } => {
            attach(c, service, node, netns, *weight, id.as_deref())?
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
                            published,
                        ]
                    })
                    .collect();
                table(&["ID", "SERVICE", "NODE", "ADDRESS", "WEIGHT", "HEALTH", "NETNS", "PUBLISHED"], rows);
            });
        }
        TaskCmd::Drain { id } => {
            write(c, Command::SetWeight { id: id.clone(), weight: 0 })?;
            println!("{id}");
        }
        TaskCmd::Detach { id } => {
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

/// `task attach`: the task (its id SERVICE.N unless given), then its
/// address once this node's state has it.
fn attach(c: &Conn, service: &str, node: &str, netns: &Option<String>, weight: u32, id: Option<&str>) -> Result<()> {
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
            container: None,
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
    print(c, &attached(&id, &ip, node, gateway.as_deref()), |_| match &gateway {
        Some(gw) => println!("{id}: {ip} on {node}, DNS {gw}"),
        None => println!("{id}: {ip} on {node}"),
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
}
