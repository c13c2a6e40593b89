//! `meshplane node run`: a node, in one of two modes. With `--tables` the
//! dataplane alone from a tables file (`static_mode`); without, with its
//! control plane, which makes the ports of the node's tasks (`managed`,
//! `task_port`) and runs their health checks (`health`). Both start their workers the same way (`workers`) and
//! report the same counters (`counters`, in the schema of
//! `dataplane::report`). System commands go through `crate::sys`; nothing here
//! uses the lab.

pub(crate) mod args;
mod config;
mod counters;
mod dns;
mod egress;
#[cfg(test)]
mod fixtures;
mod health;
mod host_port;
mod local_publish;
mod managed;
mod reaper;
mod static_mode;
mod task_port;
mod underlay;
mod workers;

use anyhow::Result;
pub(crate) use args::{DEFAULT_STATE_DIR, IoKind, RunArgs, mgmt_addr};

/// Runs the node until SIGTERM/SIGINT: static mode with `--tables`, else
/// with its control plane.
pub(crate) fn run(a: &RunArgs) -> Result<()> {
    let a = config::with_config_file(a)?;
    if a.data_path_port.is_some() {
        anyhow::bail!(
            "--data-path-port (data_path_port) is the cluster's: `meshplane cluster init --data-path-port` (static mode: the tables' node.vxlan_port)"
        );
    }
    match &a.tables {
        Some(path) => static_mode::run(&a, path),
        None => managed::run(&a),
    }
}
