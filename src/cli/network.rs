//! `meshplane network create|ls|inspect|rm`.

use super::args::{Conn, NetworkCmd};
use super::client::{state, write};
use super::render::{print, s, table};
use anyhow::{Result, anyhow};
use meshplane_control::state::Command;

/// Runs a `network` command.
pub(crate) fn run(c: &Conn, cmd: &NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create { subnet, gateway, mtu, internal, name } => {
            let subnet = subnet.parse().map_err(|e| anyhow!("--subnet {subnet:?}: {e}"))?;
            let cmd = Command::CreateNetwork {
                name: name.clone(),
                subnet,
                gateway: *gateway,
                mtu: *mtu,
                internal: *internal,
            };
            write(c, cmd)?;
            println!("{name}");
        }
        NetworkCmd::Ls => {
            let st = state(c)?;
            print(c, &st["networks"], |v| {
                let rows = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, n)| {
                        let internal = if n["internal"].as_bool() == Some(true) { "yes" } else { "no" };
                        vec![k.clone(), s(&n["vni"]), s(&n["subnet"]), s(&n["gateway"]), s(&n["mtu"]), internal.into()]
                    })
                    .collect();
                table(&["NAME", "VNI", "SUBNET", "GATEWAY", "MTU", "INTERNAL"], rows);
            });
        }
        NetworkCmd::Inspect { name } => {
            let st = state(c)?;
            let n = st["networks"].get(name).cloned().ok_or_else(|| anyhow!("no network {name:?}"))?;
            println!("{}", serde_json::to_string_pretty(&n)?);
        }
        NetworkCmd::Rm { name } => {
            write(c, Command::RemoveNetwork { name: name.clone() })?;
            println!("{name}");
        }
    }
    Ok(())
}
