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
/// The most descriptors a node asks for (the kernel's default
/// `fs.nr_open`).
const MAX_DESCRIPTORS: u64 = 1 << 20;

/// Raises the soft descriptor limit to the hard one (at most
/// [`MAX_DESCRIPTORS`]): the node's own caps (management connections, DNS
/// sockets, task ports) add up past systemd's default soft 1024, and a
/// node out of descriptors fails to make ports and connections.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = hard.min(MAX_DESCRIPTORS);
    if soft >= want {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => tracing::debug!("descriptor limit raised from {soft} to {want}"),
        Err(e) => tracing::warn!("descriptor limit {soft}: raising it to {want} failed ({e})"),
    }
}

pub(crate) fn run(a: &RunArgs) -> Result<()> {
    let a = config::with_config_file(a)?;
    raise_descriptor_limit();
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
