//! The arguments of `meshplane node run`, and the addresses a node is
//! reached at.

use anyhow::{Result, anyhow};
use meshplane_dataplane::tables::egress::PortRange;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// The default state directory.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/meshplane";

/// A management address: IP:PORT, or IP (port 2377).
pub(crate) fn mgmt_addr(a: &str) -> Result<SocketAddr> {
    a.parse::<SocketAddr>().or_else(|_| {
        a.parse::<Ipv4Addr>()
            .map(|ip| SocketAddr::new(ip.into(), meshplane_control::cluster::MGMT_PORT))
            .map_err(|_| anyhow!("{a:?}: expected IP or IP:PORT"))
    })
}

/// The I/O backend.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IoKind {
    /// AF_XDP sockets (an XDP program steers only dataplane traffic to them).
    Afxdp,
    /// TAP devices (the dataplane creates them, or attaches to persistent ones).
    Tap,
}

/// Arguments of `meshplane node run`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// A node configuration file (TOML; keys as the long flags, with `_`
    /// for `-`: see examples/node.toml); flags given override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Static mode: the tables file (TOML; see examples/tables.toml); no
    /// control plane. Without it the node runs its control plane (state
    /// in --state-dir; `meshplane cluster init|join` next).
    #[arg(long)]
    pub(crate) tables: Option<PathBuf>,
    /// The data-path interface (the uplink; with `--io tap`, the TAP
    /// device to create).
    #[arg(long, visible_alias = "data-iface")]
    pub(crate) uplink: Option<String>,
    /// The node's name in the cluster (default: the host name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Management address (Raft, joins, admin API; gossip on its IP):
    /// IP or IP:PORT (port 2377 unless given).
    #[arg(long)]
    pub(crate) advertise_addr: Option<String>,
    /// Data-path address (VXLAN, published ports).
    #[arg(long)]
    pub(crate) data_path_addr: Option<Ipv4Addr>,
    /// The data-path NIC's MAC (default: the interface's; with TAP,
    /// 02:42 and the data-path address).
    #[arg(long)]
    pub(crate) data_mac: Option<String>,
    /// The data-path NIC's MTU (the underlay's), which bounds every
    /// network's MTU (minus 50 for VXLAN). Default: read from the NIC
    /// (at most 9216; AF_XDP: above 1714 only where the socket binds with
    /// multi-buffer, Linux 6.6; TAP: the device's, set to this when given).
    #[arg(long, value_name = "BYTES")]
    pub(crate) data_path_mtu: Option<u16>,
    /// Refused: the VXLAN port is the cluster's (`cluster init
    /// --data-path-port`; static mode: the tables' `node.vxlan_port`).
    #[arg(long, hide = true)]
    pub(crate) data_path_port: Option<u16>,
    /// Egress: the source address the world sees from this node's tasks
    /// (default: the data-path address). With AF_XDP it must be an
    /// address of the data NIC (`ip addr add A/32 dev NIC`).
    #[arg(long, value_name = "A")]
    pub(crate) egress_addr: Option<Ipv4Addr>,
    /// Egress source ports, LO-HI inclusive (default: AF_XDP 61000-65535,
    /// reserved from the kernel while the node runs; TAP 32768-65535).
    #[arg(long, value_name = "LO-HI")]
    pub(crate) egress_ports: Option<PortRange>,
    /// No egress: tasks reach nothing outside the cluster's networks
    /// (static mode: drops the tables' `[node.egress]`).
    #[arg(long, conflicts_with_all = ["egress_addr", "egress_ports"])]
    pub(crate) no_egress: bool,
    /// The link to this node's own host, through which tasks reach the
    /// host's addresses (a TAP device `mp-host`): a /30, the kernel's end
    /// the first address, meshplane's the second (default
    /// 169.254.77.0/30; managed mode, with egress).
    #[arg(long, value_name = "A.B.C.D/30")]
    pub(crate) host_link: Option<meshplane_dataplane::tables::Subnet>,
    /// No host link: tasks do not reach this node's host.
    #[arg(long, conflicts_with = "host_link")]
    pub(crate) no_host_link: bool,
    /// No embedded DNS: tasks' queries to their gateway get no answer
    /// (managed mode; DNS needs the host link, so `--no-egress` and
    /// `--no-host-link` turn it off too).
    #[arg(long, conflicts_with_all = ["dns_ports", "dns_upstream"])]
    pub(crate) no_dns: bool,
    /// The embedded DNS server's ports on the host link's kernel end, one
    /// per network (LO plus the network's VNI less 4096), LO-HI inclusive
    /// (default 25300-26323: 1024 networks).
    #[arg(long, value_name = "LO-HI")]
    pub(crate) dns_ports: Option<PortRange>,
    /// Where the embedded DNS forwards names outside the cluster: IP or
    /// IP:PORT, repeatable, at most three used (default: the `nameserver`
    /// lines of this node's /etc/resolv.conf, read again when it changes).
    #[arg(long, value_name = "IP[:PORT]", value_parser = super::dns::parse_upstream)]
    pub(crate) dns_upstream: Vec<SocketAddr>,
    /// More addresses the routing mesh answers on besides the data-path
    /// address, repeatable (with `--io afxdp` every IPv4 address of the
    /// data NIC is one already, followed at each publication).
    #[arg(long, value_name = "IP")]
    pub(crate) mesh_addr: Vec<Ipv4Addr>,
    /// Gossip UDP port.
    #[arg(long)]
    pub(crate) gossip_port: Option<u16>,
    /// Prometheus metrics (`GET /metrics`, plain HTTP): IP:PORT, or `off`
    /// (default: the management IP, port 9323).
    #[arg(long)]
    pub(crate) metrics_addr: Option<String>,
    /// The node's state directory (identity, Raft log, admin socket).
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// A task port: the tables port NAME served by interface IFACE.
    #[arg(long = "task-port", value_name = "NAME=IFACE", value_parser = parse_task_port)]
    pub(crate) task_ports: Vec<(String, String)>,
    /// I/O backend.
    #[arg(long, value_enum)]
    pub(crate) io: Option<IoKind>,
    /// Cores to run workers on, one worker per core, pinned (one unpinned
    /// worker if omitted). Worker k serves queue k of every port; worker 0
    /// owns the connection state, and the others hand it the frames that
    /// touch it.
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "workers")]
    pub(crate) cores: Vec<usize>,
    /// Workers to run, not pinned (the scheduler places them); `--cores`
    /// pins one per core instead.
    #[arg(long, value_name = "N")]
    pub(crate) workers: Option<usize>,
    /// Poll without ever sleeping (lowest latency; one core at 100%); with
    /// AF_XDP also sets the sockets' busy-poll options.
    #[arg(long)]
    pub(crate) busy_poll: bool,
    /// After the last frame, how long (microseconds) a worker whose ports
    /// are all drained keeps looking for the next one before it sleeps,
    /// yielding its core to any thread that needs it between looks. Saves
    /// the wake-up of a sleeping core per request under request/response
    /// traffic; 0 sleeps at once. Default 100.
    #[arg(long, value_name = "MICROSECONDS", value_parser = clap::value_parser!(u64).range(0..=meshplane_dataplane::worker::MAX_FD_SPIN_US))]
    pub(crate) spin_us: Option<u64>,
    /// The workers' nice value, -20 to 19: below the tasks' 0, a worker
    /// woken by frames runs before a task sharing its core (as the
    /// kernel's softirq would), which keeps bursts of new connections
    /// from overflowing its receive rings. Default -10.
    #[arg(long, value_name = "NICE", allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(i64::from(*meshplane_dataplane::worker::WORKER_NICE_RANGE.start())..=i64::from(*meshplane_dataplane::worker::WORKER_NICE_RANGE.end())))]
    pub(crate) worker_nice: Option<i32>,
    /// Connection-table entries per worker.
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) conntrack: usize,
    /// Flood guard: new connections a second the node tracks (worker 0
    /// owns the connection state); more are dropped and counted
    /// (`new_conn_rate_limited`). Pickups of TCP connections seen without
    /// their SYN may use a quarter of it. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = meshplane_dataplane::lb::conntrack::DEFAULT_MAX_NEW_PER_SEC)]
    pub(crate) max_new_conns_per_sec: u32,
    /// Write the counters as JSON to this file every half second and at
    /// exit (written to a temporary file and renamed).
    #[arg(long)]
    pub(crate) stats_file: Option<PathBuf>,
    /// AF_XDP: attach the XDP program in generic (skb) mode instead of
    /// trying native mode first.
    #[arg(long)]
    pub(crate) xdp_generic: bool,
    /// AF_XDP: entries of each ring (fill, completion, rx, tx); a power of
    /// two.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub(crate) xdp_ring: u32,
    /// AF_XDP: UMEM frames (2 KiB each) per socket; at least twice the
    /// ring.
    #[arg(long, default_value_t = 8192)]
    pub(crate) xdp_frames: u32,
}

fn parse_task_port(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, i)) if !n.is_empty() && !i.is_empty() => Ok((n.to_owned(), i.to_owned())),
        _ => Err(format!("expected NAME=IFACE (a tables port and an interface), got {s:?}")),
    }
}
