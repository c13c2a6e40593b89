//! `meshplane cluster init|join|token|rotate-gossip-key|info`.

use super::args::{ClusterCmd, Conn, RoleArg};
use super::client::call;
use super::render::{print, s};
use anyhow::Result;
use meshplane_control::cluster::AdminRequest;
use meshplane_control::pki::JoinRole;

/// Runs a `cluster` command.
pub(crate) fn run(c: &Conn, cmd: &ClusterCmd) -> Result<()> {
    let v = match cmd {
        ClusterCmd::Init { cert_expiry_hours, data_path_port } => call(
            c,
            AdminRequest::Init {
                cert_expiry_secs: Some(cert_expiry_hours * 3600),
                data_path_port: Some(*data_path_port),
            },
        )?,
        ClusterCmd::Join { token, addr } => {
            call(c, AdminRequest::Join { token: token.clone(), addr: crate::node::mgmt_addr(addr)? })?
        }
        ClusterCmd::Token { role, rotate } => {
            let role = match role {
                RoleArg::Worker => JoinRole::Worker,
                RoleArg::Manager => JoinRole::Manager,
            };
            call(c, AdminRequest::Token { role, rotate: *rotate })?
        }
        ClusterCmd::RotateGossipKey => call(c, AdminRequest::RotateGossipKey)?,
        ClusterCmd::Info => call(c, AdminRequest::Info)?,
    };
    print(c, &v, |v| match cmd {
        ClusterCmd::Init { .. } => {
            println!(
                "cluster initialised; {} is its first manager; data path on udp port {}",
                s(&v["node"]),
                s(&v["data_path_port"])
            );
            println!("join a worker:  meshplane cluster join --token {} <this node's IP>", s(&v["worker_token"]));
            println!("join a manager: meshplane cluster join --token {} <this node's IP>", s(&v["manager_token"]));
        }
        ClusterCmd::Join { .. } => println!("{} joined as a {}", s(&v["node"]), s(&v["role"])),
        ClusterCmd::Token { .. } => println!("{}", s(&v["token"])),
        ClusterCmd::RotateGossipKey => println!("gossip key {} in use", s(&v["key_id"])),
        ClusterCmd::Info => {
            for k in ["node", "role", "version", "leader", "tables_version"] {
                println!("{k:<15} {}", s(&v[k]));
            }
        }
    });
    Ok(())
}
