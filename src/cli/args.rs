//! The arguments of the CLI's nouns that talk to a node's admin API:
//! `cluster`, `node` (besides `run`), `network`, `service`, `task`,
//! `conntrack`, `lb`, and how to reach the node (`Conn`); and `cni`'s
//! (which installs files for container runtimes).

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// How to reach the node and how to print.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Conn {
    /// The node's state directory (its admin socket is there).
    #[arg(long, global = true, env = "MESHPLANE_STATE_DIR", default_value = crate::node::DEFAULT_STATE_DIR)]
    pub(crate) state_dir: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub(crate) format: Format,
}

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Aligned columns.
    Table,
    /// JSON, as the admin API answers.
    Json,
}

/// `meshplane cluster …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ClusterCmd {
    /// Make a new cluster with this node as its first manager; prints the
    /// join tokens.
    Init {
        /// How long node certificates are valid, in hours (Swarm's
        /// --cert-expiry; nodes renew theirs when half of it is gone).
        #[arg(long = "cert-expiry-hours", default_value_t = 2160, value_parser = clap::value_parser!(u64).range(1..=87600))]
        cert_expiry_hours: u64,
        /// The UDP port of the data path (VXLAN) on every node (Swarm's
        /// --data-path-port): 1024 to 49151, or 4789; fixed for the
        /// cluster's life.
        #[arg(long, default_value_t = 4789, value_parser = parse_data_path_port)]
        data_path_port: u16,
    },
    /// Join a cluster through a manager (ADDR: IP or IP:PORT, port 2377).
    Join {
        /// The join token (`cluster token` on a manager).
        #[arg(long)]
        token: String,
        /// A manager's management address.
        addr: String,
    },
    /// Print the join token for workers or managers.
    Token {
        /// worker or manager.
        #[arg(value_enum, default_value = "worker")]
        role: RoleArg,
        /// Rotate it first: the old token stops working.
        #[arg(long)]
        rotate: bool,
    },
    /// Draw a new gossip key (the previous one still opens packets until
    /// the next rotation).
    RotateGossipKey,
    /// This node: name, role, state version, Raft leader.
    Info,
}

/// Join roles.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub(crate) enum RoleArg {
    /// A worker.
    Worker,
    /// A manager.
    Manager,
}

/// `meshplane node ls|inspect|update|rm`, with how to reach the node.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum NodeAdmin {
    /// List the cluster's nodes.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// One node, in full.
    Inspect {
        #[command(flatten)]
        conn: Conn,
        /// The node.
        name: String,
    },
    /// Change a node's availability.
    Update {
        #[command(flatten)]
        conn: Conn,
        /// active, pause or drain.
        #[arg(long, value_enum)]
        availability: AvailabilityArg,
        /// The node.
        name: String,
    },
    /// Make a worker a manager (it renews its certificate, starts Raft
    /// and becomes a voter).
    Promote {
        #[command(flatten)]
        conn: Conn,
        /// The node.
        name: String,
    },
    /// Make a manager a worker (it leaves Raft's voters; not the last
    /// manager).
    Demote {
        #[command(flatten)]
        conn: Conn,
        /// The node.
        name: String,
    },
    /// Remove a node (and its tasks) from the cluster; its certificate is
    /// refused from then on.
    Rm {
        #[command(flatten)]
        conn: Conn,
        /// The node.
        name: String,
    },
}

/// Availabilities.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub(crate) enum AvailabilityArg {
    /// Takes tasks.
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Its tasks are drained.
    Drain,
}

/// `meshplane network …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum NetworkCmd {
    /// Create an overlay network (its VNI is allocated from 4096).
    Create {
        /// Subnet, e.g. 198.19.0.0/24.
        #[arg(long)]
        subnet: String,
        /// Gateway (default: the subnet's last host address).
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// MTU of the tasks' interfaces (default 1450, or less if a node's
        /// underlay carries less); at most the smallest underlay MTU of the
        /// cluster's nodes minus 50 (jumbo underlays: up to 8950 on 9000).
        #[arg(long)]
        mtu: Option<u16>,
        /// No egress (Docker's --internal): the tasks reach the cluster's
        /// networks and services only; packets to anything else are
        /// dropped and counted (`egress_internal`).
        #[arg(long)]
        internal: bool,
        /// The network's name.
        name: String,
    },
    /// List networks.
    Ls,
    /// One network, in full.
    Inspect {
        /// The network.
        name: String,
    },
    /// Remove a network without services.
    Rm {
        /// The network.
        name: String,
    },
}

/// `meshplane service …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ServiceCmd {
    /// Create a service: a VIP in its network and/or published ports on
    /// every node (the routing mesh).
    Create(ServiceCreate),
    /// List services.
    Ls,
    /// One service, in full, with its tasks.
    Inspect {
        /// The service.
        name: String,
    },
    /// Change a service's scheduler, published ports or health check
    /// (connections in flight keep their backends).
    Update {
        /// A new scheduler.
        #[arg(long, value_enum)]
        scheduler: Option<SchedArg>,
        /// The health check: a new one, fields of the one it has changed
        /// (the others kept), or removed with --no-healthcheck.
        #[command(flatten)]
        health: HealthArgs,
        /// Publish a port (as `create --publish`; the target port is the
        /// service's).
        #[arg(long)]
        publish_add: Vec<String>,
        /// Withdraw a published port.
        #[arg(long)]
        publish_rm: Vec<u16>,
        /// The service.
        name: String,
    },
    /// Remove a service and its tasks.
    Rm {
        /// The service.
        name: String,
    },
}

/// `meshplane service create`'s arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct ServiceCreate {
    /// Its name.
    #[arg(long)]
    pub(crate) name: String,
    /// Its tasks' network.
    #[arg(long)]
    pub(crate) network: String,
    /// tcp or udp.
    #[arg(long, value_enum, default_value = "tcp")]
    pub(crate) protocol: ProtoArg,
    /// The VIP's port, translated to the target port. Without it the VIP
    /// (every vip-mode service has one, allocated from the subnet) carries
    /// every TCP and UDP port untranslated, as Swarm's VIPs do.
    #[arg(long)]
    pub(crate) vip_port: Option<u16>,
    /// The tasks' port (or give it in --publish PUB:TARGET).
    #[arg(long)]
    pub(crate) target_port: Option<u16>,
    /// Publish a port: `[mode=nat|preserve-source,]PUB:TARGET`, or
    /// `:TARGET` for a port chosen from 30000-32767.
    #[arg(long)]
    pub(crate) publish: Vec<String>,
    /// Scheduler.
    #[arg(long, value_enum, default_value = "mh")]
    pub(crate) scheduler: SchedArg,
    /// How the tasks are reached: `vip` (a VIP balanced over them) or
    /// `dnsrr` (DNS answers with their addresses; no VIP, no --publish).
    #[arg(long, value_enum, default_value = "vip")]
    pub(crate) endpoint_mode: EndpointModeArg,
    /// A health check of the tasks (none unless --health-cmd).
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

/// A service's health check, as Docker's `--health-*` options: each task's
/// node probes the task's target port from inside the task's namespace;
/// a task that has not passed yet, or failed `retries` probes in a row,
/// leaves every balancer and DNS answer until a probe passes.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct HealthArgs {
    /// The probe: `tcp` (a connection to the target port is accepted) or
    /// `http:/PATH` (an HTTP GET of PATH answers 2xx or 3xx, as `curl -f`).
    #[arg(long, value_name = "tcp|http:/PATH")]
    pub(crate) health_cmd: Option<String>,
    /// Time between probes, e.g. 5s, 500ms, 1m [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub(crate) health_interval: Option<u64>,
    /// Time a probe may take, at most the interval [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub(crate) health_timeout: Option<u64>,
    /// Failed probes in a row that make a task unhealthy, 1 to 100
    /// [default: 3].
    #[arg(long, value_name = "N")]
    pub(crate) health_retries: Option<u32>,
    /// Time after a task starts during which failed probes do not count
    /// [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub(crate) health_start_period: Option<u64>,
    /// No health check (`service update`: remove the one it has).
    #[arg(long, conflicts_with_all = ["health_cmd", "health_interval", "health_timeout", "health_retries", "health_start_period"])]
    pub(crate) no_healthcheck: bool,
}

/// Endpoint modes (Docker's `--endpoint-mode`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndpointModeArg {
    /// A VIP.
    Vip,
    /// DNS round robin.
    Dnsrr,
}

/// Protocols.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub(crate) enum ProtoArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Schedulers.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub(crate) enum SchedArg {
    /// Maglev consistent hashing.
    Mh,
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Source hash.
    Sh,
}

/// `meshplane task …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum TaskCmd {
    /// Attach a task of a service on a node: the node makes its port in
    /// the namespace --netns or --pid (address, MAC, default route set).
    Attach {
        /// The service.
        #[arg(long)]
        service: String,
        /// The node it runs on [default: this node].
        #[arg(long)]
        node: Option<String>,
        /// The network namespace its port goes into: a name made by `ip
        /// netns add` ([A-Za-z0-9_.-], up to 64), /var/run/netns/NAME,
        /// /proc/PID/ns/net, or the absolute path of a namespace file (a
        /// runtime's bind mount).
        #[arg(long, conflicts_with = "pid")]
        netns: Option<String>,
        /// The process whose network namespace the port goes into (a
        /// container's: `docker inspect -f '{{.State.Pid}}' NAME`), on
        /// this node. The task is that container's: it is detached when
        /// the namespace goes.
        #[arg(long)]
        pid: Option<u32>,
        /// The container the task is (with --pid: default the id in the
        /// process's cgroup, Docker's or podman's, else pid-PID).
        #[arg(long)]
        container: Option<String>,
        /// Balancing weight.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Its id (default: SERVICE.N, the lowest N free).
        #[arg(long)]
        id: Option<String>,
    },
    /// List tasks.
    Ls {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
    },
    /// Drain a task: weight 0, its connections go on, no new ones.
    Drain {
        /// The task.
        id: String,
    },
    /// Detach a task (its port is removed), by its id or its container's.
    Detach {
        /// The task.
        #[arg(required_unless_present = "container", conflicts_with = "container")]
        id: Option<String>,
        /// The container's id, or a prefix of it (at least 4 characters)
        /// that names one task.
        #[arg(long)]
        container: Option<String>,
    },
}

/// `meshplane cni …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum CniCmd {
    /// Install the CNI plugin in a runtime's CNI bin directory, and with
    /// --network a conflist for it; then print what each runtime needs.
    Install(CniInstall),
    /// Remove a network's conflist (--network), or the plugin.
    Uninstall(CniUninstall),
}

/// `meshplane cni install`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct CniInstall {
    /// The runtime's CNI plugin directory (the plugin goes in as
    /// `meshplane`).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub(crate) bin_dir: PathBuf,
    /// The runtime's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub(crate) conf_dir: PathBuf,
    /// The plugin to install [default: meshplane-cni beside this binary].
    #[arg(long)]
    pub(crate) plugin: Option<PathBuf>,
    /// Write a conflist for the network NAME (the name runtimes know it
    /// by: `podman run --network NAME`).
    #[arg(long, value_name = "NAME")]
    pub(crate) network: Option<String>,
    /// The service the network's containers join.
    #[arg(long, requires = "network")]
    pub(crate) service: Option<String>,
    /// The services a container may choose instead (CNI_ARGS
    /// MESHPLANE_SERVICE=, or the pod annotation meshplane.io/service):
    /// a,b, or * for any.
    #[arg(long, requires = "network", value_delimiter = ',')]
    pub(crate) services: Vec<String>,
    /// The node's admin socket [default: the --state-dir's when it is not
    /// the default, else the plugin's default, /var/lib/meshplane/admin.sock].
    #[arg(long, requires = "network")]
    pub(crate) socket: Option<PathBuf>,
    /// The conflist's cniVersion (0.4.0, 1.0.0 or 1.1.0; the runtimes of
    /// Debian bookworm need 1.0.0 or older).
    #[arg(long, default_value = "1.0.0", requires = "network")]
    pub(crate) cni_version: String,
    /// Declare the capability io.kubernetes.cri.pod-annotations
    /// (Kubernetes on containerd: the pod annotation meshplane.io/service
    /// may choose a service of --services).
    #[arg(long, requires = "network")]
    pub(crate) pod_annotations: bool,
    /// The conflist's file name starts with it (runtimes that use one
    /// network take the first by name: ctr run --cni).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub(crate) priority: u8,
    /// Replace a different plugin or conflist already there.
    #[arg(long)]
    pub(crate) force: bool,
}

/// `meshplane cni uninstall`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct CniUninstall {
    /// The runtime's CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub(crate) bin_dir: PathBuf,
    /// The runtime's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub(crate) conf_dir: PathBuf,
    /// Remove this network's conflist (else: the plugin, once no conflist
    /// uses it).
    #[arg(long, value_name = "NAME")]
    pub(crate) network: Option<String>,
    /// Remove the plugin even though conflists use it, or though it is
    /// not meshplane's.
    #[arg(long)]
    pub(crate) force: bool,
}

/// `meshplane conntrack …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ConntrackCommand {
    /// List tracked connections (both directions of each).
    Ls {
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
    },
}

/// `meshplane lb …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum LbCommand {
    /// Services, backends, weights, active and new connections.
    Ls,
}

/// A duration as Docker's `--health-*` options take it (`5s`, `500ms`,
/// `1m30s`), in milliseconds.
fn parse_duration_ms(s: &str) -> std::result::Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 5s, 500ms, 1m30s)"))?;
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?}: too long"))
}

/// `cluster init --data-path-port`: Docker's rule (1024 to 49151, or 4789).
fn parse_data_path_port(s: &str) -> std::result::Result<u16, String> {
    let p: u16 = s.parse().map_err(|_| format!("{s:?} is not a port"))?;
    if meshplane_control::state::valid_data_path_port(p) {
        Ok(p)
    } else {
        Err(format!("{p}: the data-path port is 1024 to 49151, or 4789"))
    }
}
