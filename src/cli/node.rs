//! `meshplane node ls|inspect|update|promote|demote|rm`.

use super::args::{AvailabilityArg, NodeAdmin};
use super::client::{call, state, write};
use super::render::{print, s, table};
use anyhow::{Result, anyhow};
use meshplane_control::cluster::AdminRequest;
use meshplane_control::state::{Availability, Command, Role};
use serde_json::Value;

/// Runs a `node` command (besides `run`).
pub(crate) fn run(cmd: &NodeAdmin) -> Result<()> {
    match cmd {
        NodeAdmin::Ls { conn: c } => {
            let v = call(c, AdminRequest::Nodes)?;
            print(c, &v, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| {
                        let me = if n["self"] == Value::Bool(true) { " *" } else { "" };
                        vec![
                            format!("{}{me}", s(&n["name"])),
                            s(&n["status"]),
                            s(&n["availability"]),
                            s(&n["manager_status"]),
                            s(&n["mgmt"]),
                            s(&n["data_ip"]),
                        ]
                    })
                    .collect();
                table(&["NAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "MANAGEMENT", "DATA PATH"], rows);
            });
        }
        NodeAdmin::Inspect { conn: c, name } => {
            let st = state(c)?;
            let n = st["nodes"].get(name).cloned().ok_or_else(|| anyhow!("no node {name:?}"))?;
            println!("{}", serde_json::to_string_pretty(&n)?);
        }
        NodeAdmin::Update { conn: c, availability, name } => {
            let availability = match availability {
                AvailabilityArg::Active => Availability::Active,
                AvailabilityArg::Pause => Availability::Pause,
                AvailabilityArg::Drain => Availability::Drain,
            };
            write(c, Command::SetAvailability { id: name.clone(), availability })?;
            println!("{name}");
        }
        NodeAdmin::Promote { conn: c, name } => {
            write(c, Command::SetRole { id: name.clone(), role: Role::Manager })?;
            println!("{name} promoted to a manager");
        }
        NodeAdmin::Demote { conn: c, name } => {
            write(c, Command::SetRole { id: name.clone(), role: Role::Worker })?;
            println!("{name} demoted to a worker");
        }
        NodeAdmin::Rm { conn: c, name } => {
            write(c, Command::RemoveNode { id: name.clone() })?;
            println!("{name}");
        }
    }
    Ok(())
}
