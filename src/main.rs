//! The `meshplane` binary: CLI, configuration and thread start-up.

use clap::Parser;

mod cli;
mod lab;
mod metrics;
mod node;
mod pktgen;
mod stats;
mod sys;
mod tool;
mod trace;

use cli::args::{Conn, ConntrackCommand, LbCommand};

/// meshplane: a userspace container-networking dataplane (VXLAN overlay,
/// service VIPs, routing mesh) off the kernel's data path.
#[derive(Parser, Debug)]
#[command(name = "meshplane", version, about, long_about = None)]
struct Cli {
    /// Log level (logs go to stderr): error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

/// Structured logs on stderr at `level` (openraft's own at warn unless
/// debug or trace is asked for).
fn init_logs(level: tracing::Level) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let raft = if level >= tracing::Level::DEBUG { level } else { tracing::Level::WARN };
    let filter = tracing_subscriber::filter::Targets::new().with_target("openraft", raft).with_default(level);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let _ = tracing_subscriber::registry().with(fmt).with(filter).try_init();
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print the ports meshplane uses by default.
    Ports,
    /// Run the dataplane offline over a capture: which frames would be sent
    /// where, which dropped and why.
    Trace(trace::TraceArgs),
    /// Run a node, and the cluster's nodes (ls, inspect, update, rm).
    #[command(subcommand)]
    Node(NodeCommand),
    /// The cluster: init, join, tokens, gossip key, info.
    Cluster {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: cli::args::ClusterCmd,
    },
    /// Overlay networks: create, ls, inspect, rm.
    Network {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: cli::args::NetworkCmd,
    },
    /// Services (VIPs, published ports): create, ls, inspect, rm.
    Service {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: cli::args::ServiceCmd,
    },
    /// A service's tasks: attach, ls, drain, detach.
    Task {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: cli::args::TaskCmd,
    },
    /// This node's dataplane counters: per port and worker, drops by
    /// reason; gossip's.
    Stats {
        #[command(flatten)]
        conn: Conn,
        /// Print again every second, with rates.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many prints.
        #[arg(long)]
        count: Option<u32>,
    },
    /// The connections this node tracks, like `ipvsadm -Lnc`.
    Conntrack {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: ConntrackCommand,
    },
    /// This node's balancers, like `ipvsadm -Ln`.
    Lb {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: LbCommand,
    },
    /// Container runtimes (podman, containerd, Kubernetes): install the
    /// CNI plugin and a network's conflist, or remove them.
    Cni {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: cli::args::CniCmd,
    },
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
    /// Run a node: its control plane and pinned workers (state in
    /// --state-dir), or with --tables the dataplane alone from a tables
    /// file (static mode; SIGHUP reloads it). SIGTERM stops it cleanly.
    Run(Box<node::RunArgs>),
    #[command(flatten)]
    Admin(cli::args::NodeAdmin),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_level);
    let printer = matches!(
        cli.command,
        Command::Cluster { .. }
            | Command::Network { .. }
            | Command::Service { .. }
            | Command::Task { .. }
            | Command::Stats { .. }
            | Command::Lb { .. }
            | Command::Conntrack { .. }
            | Command::Node(NodeCommand::Admin(_))
            | Command::Ports
            | Command::Cni { .. }
            | Command::Trace(_)
            | Command::Lab(_)
            | Command::Pktgen(_)
            | Command::Tool(_)
    );
    if printer {
        // A command that prints, piped into `head`: ends quietly when the
        // reader goes, as other CLIs do (Rust ignores SIGPIPE, so a print
        // to a closed pipe would panic). Nodes keep ignoring it.
        #[allow(unsafe_code)]
        // SAFETY: signal(2) with SIG_DFL for SIGPIPE, before any thread is
        // started; no handler runs, so nothing is unsafe to call from one.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Ports => {
            println!("management (raft, admin API): tcp {}", meshplane_control::MANAGEMENT_PORT);
            println!("control (gossip):             tcp+udp {}", meshplane_control::GOSSIP_PORT);
            println!("data (VXLAN):                 udp {}", meshplane_dataplane::wire::vxlan::DEFAULT_PORT);
        }
        Command::Trace(a) => trace::run(&a)?,
        Command::Node(NodeCommand::Run(a)) => node::run(&a)?,
        Command::Node(NodeCommand::Admin(c)) => cli::node::run(&c)?,
        Command::Cluster { conn, cmd } => cli::cluster::run(&conn, &cmd)?,
        Command::Network { conn, cmd } => cli::network::run(&conn, &cmd)?,
        Command::Service { conn, cmd } => cli::service::run(&conn, &cmd)?,
        Command::Task { conn, cmd } => cli::task::run(&conn, &cmd)?,
        Command::Stats { conn, watch, count } => cli::stats::run(&conn, watch, count)?,
        Command::Lb { conn, cmd: LbCommand::Ls } => cli::lb::ls(&conn)?,
        Command::Conntrack { conn, cmd: ConntrackCommand::Ls { service } } => {
            cli::conntrack::ls(&conn, service.as_deref())?
        }
        Command::Cni { conn, cmd } => cli::cni::run(&conn, &cmd)?,
        Command::Tool(c) => tool::run(&c)?,
        Command::Pktgen(a) => pktgen::run(&a)?,
        Command::Lab(c) => lab::run(&c)?,
    }
    Ok(())
}
