//! `meshplane lb ls`: like `ipvsadm -Ln`: every balanced address of this
//! node with its scheduler, each backend with its weight and connections.

use super::args::{Conn, Format};
use super::client::{self, call};
use super::render::s;
use crate::stats::NodeStats;
use anyhow::Result;
use meshplane_control::cluster::AdminRequest;
use serde_json::Value;
use std::collections::BTreeMap;

/// Per service and backend address: (active, new connections), over the
/// workers.
fn connections(dp: &NodeStats) -> BTreeMap<(String, String), (u64, u64)> {
    let mut conns = BTreeMap::<(String, String), (u64, u64)>::new();
    for sv in dp.workers.iter().flat_map(|w| &w.services) {
        for b in &sv.backends {
            let e = conns.entry((sv.name.clone(), b.ip.to_string())).or_default();
            e.0 += u64::from(b.active);
            e.1 += b.new_connections;
        }
    }
    conns
}

/// Prints the node's balancers from its tables, with the counters.
pub(crate) fn ls(c: &Conn) -> Result<()> {
    let tables = call(c, AdminRequest::Tables)?;
    let stats = client::stats(c)?;
    let data_ip = s(&tables["node"]["data_ip"]);
    let conns = connections(&stats.dataplane);
    if c.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "tables": tables, "stats": stats }))?);
        return Ok(());
    }
    println!("Prot LocalAddress:Port            Scheduler  Service");
    println!("  -> RemoteAddress:Port           Weight     ActiveConn NewConn");
    for sv in tables["service"].as_array().into_iter().flatten() {
        let name = s(&sv["name"]);
        let proto = s(&sv["protocol"]).to_uppercase();
        let target = s(&sv["target_port"]);
        let mut addrs = Vec::new();
        match (&sv["vip"], sv["port"].as_u64()) {
            // An every-port VIP (both protocols, untranslated).
            (Value::String(vip), Some(0)) => addrs.push(format!("{vip}:*")),
            (Value::String(vip), Some(p)) => addrs.push(format!("{vip}:{p}")),
            _ => {}
        }
        for p in sv["published"].as_array().into_iter().flatten() {
            addrs.push(format!("{data_ip}:{} ({})", s(&p["port"]), s(&p["mode"])));
        }
        for a in addrs {
            println!("{proto:<4} {a:<29} {:<10} {name}", s(&sv["scheduler"]));
            for b in sv["backend"].as_array().into_iter().flatten() {
                let ip = s(&b["ip"]);
                let (active, new) = conns.get(&(name.clone(), ip.clone())).copied().unwrap_or_default();
                println!("  -> {:<29} {:<10} {active:<10} {new}", format!("{ip}:{target}"), s(&b["weight"]));
            }
        }
    }
    Ok(())
}
