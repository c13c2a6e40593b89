//! The `meshplane` binary: CLI, configuration and thread start-up.

use clap::Parser;

mod lab;
mod node;
mod pktgen;
mod tool;
mod trace;

/// meshplane: a userspace container-networking dataplane (VXLAN overlay,
/// service VIPs, routing mesh) off the kernel's data path.
#[derive(Parser, Debug)]
#[command(name = "meshplane", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print the ports meshplane uses by default.
    Ports,
    /// Run the dataplane offline over a capture: which frames would be sent
    /// where, which dropped and why.
    Trace(trace::TraceArgs),
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// A cluster on this machine in network namespaces: up, status, demo,
    /// down.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Generate traffic (AF_XDP, or TAP) and count what comes back: Mpps,
    /// Gbps, loss, latency. Always bounded by --count and --duration.
    Pktgen(pktgen::PktgenArgs),
    /// Traffic endpoints for tests and the lab (TCP stream check, UDP echo).
    #[command(subcommand, hide = true)]
    Tool(tool::ToolCommand),
}

#[derive(clap::Subcommand, Debug)]
enum NodeCommand {
    /// Run the dataplane alone from a tables file (static mode: no control
    /// plane). SIGTERM stops it; SIGHUP reloads the tables file.
    Run(node::RunArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Ports => {
            println!("management (raft, admin API): tcp {}", meshplane_control::MANAGEMENT_PORT);
            println!("control (gossip):             tcp+udp {}", meshplane_control::GOSSIP_PORT);
            println!("data (VXLAN):                 udp {}", meshplane_dataplane::wire::vxlan::DEFAULT_PORT);
        }
        Command::Trace(a) => trace::run(&a)?,
        Command::Node(NodeCommand::Run(a)) => node::run(&a)?,
        Command::Tool(c) => tool::run(&c)?,
        Command::Pktgen(a) => pktgen::run(&a)?,
        Command::Lab(c) => lab::run(&c)?,
    }
    Ok(())
}
