//! `meshplane lab up|status|demo|down`: a cluster on this one machine, in
//! network namespaces named `mp-lab-*`, addresses from 198.18.0.0/15.
//!
//! Three nodes, each a namespace with a data NIC on a shared underlay
//! fabric (a bridge) and a management NIC on a second one; a client
//! namespace on the fabric; an overlay network `app` and a service `web`
//! published on every node in both modes (30080 `nat`, 30081
//! `preserve-source`) with one task per node, each in its own namespace,
//! running a small HTTP server that answers with its name and the client
//! address it saw.
//!
//! The nodes run with their control plane (`meshplane node run`, state in
//! the lab directory), and the lab builds the cluster the way a user does,
//! with the CLI: `cluster init` on node1, `cluster join` on the others
//! (all three managers), `network create`, `service create`, `task attach
//! --netns` (the nodes make the tasks' ports). With `--podman`, web's
//! tasks are podman containers that meshplane's CNI plugin attaches
//! (`podman.rs`). `down` removes everything, also after a crash (it works
//! from the namespaces, pid files and podman storage it finds).

use anyhow::Result;
use std::path::PathBuf;

mod common;
mod demo;
mod nodes;
mod podman;
mod up;

/// `meshplane lab …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum LabCommand {
    /// Build the lab and start its nodes and tasks.
    Up {
        /// I/O backend of the nodes.
        #[arg(long, value_enum, default_value = "afxdp")]
        io: crate::node::IoKind,
        /// Where the lab keeps its files (tables, logs, counters, pids).
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
        /// web's tasks as podman containers, attached by meshplane's CNI
        /// plugin (podman's configuration and storage in DIR/podman).
        #[arg(long)]
        podman: bool,
    },
    /// Show what runs and the nodes' counters.
    Status {
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Send requests through the routing mesh to every node's published
    /// ports, in both modes, and print who answered and what they saw.
    Demo {
        /// Requests per node and published port.
        #[arg(long, default_value_t = 3)]
        requests: u32,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Stop one node's process (SIGTERM, or SIGKILL with --kill: a crash),
    /// to watch the cluster notice.
    StopNode {
        /// The node: 1, 2 or 3.
        node: u8,
        /// SIGKILL instead of SIGTERM.
        #[arg(long)]
        kill: bool,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Start a stopped node again (it resumes from its state directory).
    StartNode {
        /// The node: 1, 2 or 3.
        node: u8,
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
    /// Stop everything and remove the namespaces (also after a crash).
    Down {
        /// The lab's directory.
        #[arg(long, default_value = "/tmp/meshplane-lab")]
        dir: PathBuf,
    },
}

/// Runs a `lab` command.
pub(crate) fn run(c: &LabCommand) -> Result<()> {
    match c {
        LabCommand::Up { io, dir, podman } => up::up(*io, dir, *podman),
        LabCommand::Status { dir } => demo::status(dir),
        LabCommand::Demo { requests, dir } => demo::demo(*requests, dir),
        LabCommand::Down { dir } => nodes::down(dir),
        LabCommand::StopNode { node, kill, dir } => nodes::stop_node(*node, *kill, dir),
        LabCommand::StartNode { node, dir } => nodes::start_node(*node, dir),
    }
}
