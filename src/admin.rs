//! The CLI verbs that talk to the local node's admin API (its unix socket
//! in the state directory): `cluster`, `node`, `network`, `service`,
//! `task`, `stats`, `lb`. Human tables by default, `--format json` for
//! scripts. Refused requests print the node's reason and exit non-zero.

use anyhow::{Context, Result, anyhow, bail};
use meshplane_control::cluster::{AdminRequest, admin_call};
use meshplane_control::pki::JoinRole;
use meshplane_control::state::{Availability, Command, PublishRequest};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// How to reach the node and how to print.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Conn {
    /// The node's state directory (its admin socket is there).
    #[arg(long, global = true, env = "MESHPLANE_STATE_DIR", default_value = crate::managed::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    format: Format,
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
    Init,
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

/// `meshplane node …` (besides `run`).
#[derive(clap::Subcommand, Debug)]
pub(crate) enum NodeAdmin {
    /// List the cluster's nodes.
    Ls,
    /// One node, in full.
    Inspect {
        /// The node.
        name: String,
    },
    /// Change a node's availability (drain: its tasks get no new
    /// connections).
    Update {
        /// active, pause or drain.
        #[arg(long, value_enum)]
        availability: AvailabilityArg,
        /// The node.
        name: String,
    },
    /// Remove a node (and its tasks) from the cluster.
    Rm {
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
        /// MTU of the tasks' interfaces (default 1450).
        #[arg(long)]
        mtu: Option<u16>,
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
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its tasks' network.
        #[arg(long)]
        network: String,
        /// tcp or udp.
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: ProtoArg,
        /// A VIP in the network on this port (allocated from the subnet).
        #[arg(long)]
        vip_port: Option<u16>,
        /// The tasks' port (or give it in --publish PUB:TARGET).
        #[arg(long)]
        target_port: Option<u16>,
        /// Publish a port: `[mode=nat|preserve-source,]PUB:TARGET`, or
        /// `:TARGET` for a port chosen from 30000-32767.
        #[arg(long)]
        publish: Vec<String>,
        /// Scheduler.
        #[arg(long, value_enum, default_value = "mh")]
        scheduler: SchedArg,
    },
    /// List services.
    Ls,
    /// One service, in full, with its tasks.
    Inspect {
        /// The service.
        name: String,
    },
    /// Change a service's scheduler or published ports (connections in
    /// flight keep their backends).
    Update {
        /// A new scheduler.
        #[arg(long, value_enum)]
        scheduler: Option<SchedArg>,
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
    /// the namespace --netns (address, MAC, default route set).
    Attach {
        /// The service.
        #[arg(long)]
        service: String,
        /// The node it runs on.
        #[arg(long)]
        node: String,
        /// The network namespace its port goes into.
        #[arg(long)]
        netns: Option<String>,
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
    /// Detach a task (its port is removed).
    Detach {
        /// The task.
        id: String,
    },
}

fn call(c: &Conn, req: AdminRequest) -> Result<Value> {
    let sock = c.state_dir.join("admin.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt
        .block_on(admin_call(&sock, &req))
        .with_context(|| format!("talking to the node at {} (is `meshplane node run` running?)", sock.display()))?;
    r.map_err(|e| anyhow!("{e}"))
}

fn write(c: &Conn, command: Command) -> Result<()> {
    call(c, AdminRequest::Write { command }).map(|_| ())
}

fn state(c: &Conn) -> Result<Value> {
    Ok(call(c, AdminRequest::State)?["state"].take())
}

/// Prints rows as aligned columns.
fn table(head: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        x => x.to_string(),
    }
}

fn print(c: &Conn, v: &Value, human: impl FnOnce(&Value)) {
    match c.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Format::Table => human(v),
    }
}

/// A management address: IP:PORT, or IP (port 2377).
pub(crate) fn mgmt_addr(a: &str) -> Result<SocketAddr> {
    a.parse::<SocketAddr>().or_else(|_| {
        a.parse::<Ipv4Addr>()
            .map(|ip| SocketAddr::new(ip.into(), meshplane_control::cluster::MGMT_PORT))
            .map_err(|_| anyhow!("{a:?}: expected IP or IP:PORT"))
    })
}

pub(crate) fn cluster(c: &Conn, cmd: &ClusterCmd) -> Result<()> {
    let v = match cmd {
        ClusterCmd::Init => call(c, AdminRequest::Init)?,
        ClusterCmd::Join { token, addr } => {
            call(c, AdminRequest::Join { token: token.clone(), addr: mgmt_addr(addr)? })?
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
        ClusterCmd::Init => {
            println!("cluster initialised; {} is its first manager", s(&v["node"]));
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

pub(crate) fn node(c: &Conn, cmd: &NodeAdmin) -> Result<()> {
    match cmd {
        NodeAdmin::Ls => {
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
        NodeAdmin::Inspect { name } => {
            let st = state(c)?;
            let n = st["nodes"].get(name).cloned().ok_or_else(|| anyhow!("no node {name:?}"))?;
            println!("{}", serde_json::to_string_pretty(&n)?);
        }
        NodeAdmin::Update { availability, name } => {
            let availability = match availability {
                AvailabilityArg::Active => Availability::Active,
                AvailabilityArg::Pause => Availability::Pause,
                AvailabilityArg::Drain => Availability::Drain,
            };
            write(c, Command::SetAvailability { id: name.clone(), availability })?;
            println!("{name}");
        }
        NodeAdmin::Rm { name } => {
            write(c, Command::RemoveNode { id: name.clone() })?;
            println!("{name}");
        }
    }
    Ok(())
}

pub(crate) fn network(c: &Conn, cmd: &NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create { subnet, gateway, mtu, name } => {
            let subnet = subnet.parse().map_err(|e| anyhow!("--subnet {subnet:?}: {e}"))?;
            write(c, Command::CreateNetwork { name: name.clone(), subnet, gateway: *gateway, mtu: *mtu })?;
            println!("{name}");
        }
        NetworkCmd::Ls => {
            let st = state(c)?;
            print(c, &st["networks"], |v| {
                let rows = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, n)| vec![k.clone(), s(&n["vni"]), s(&n["subnet"]), s(&n["gateway"]), s(&n["mtu"])])
                    .collect();
                table(&["NAME", "VNI", "SUBNET", "GATEWAY", "MTU"], rows);
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

/// `[mode=nat|preserve-source,]PUB:TARGET` (also `published=`, `target=`
/// keys, and `:TARGET` for an auto-assigned port): the request and the
/// target port.
fn parse_publish(spec: &str) -> Result<(PublishRequest, Option<u16>)> {
    let (mut mode, mut port, mut target) = (MeshMode::Nat, None, None);
    let num = |x: &str, what: &str| -> Result<u16> {
        x.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| anyhow!("--publish {spec:?}: bad {what} port {x:?}"))
    };
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("mode", "nat" | "ingress")) => mode = MeshMode::Nat,
            Some(("mode", "preserve-source")) => mode = MeshMode::PreserveSource,
            Some(("mode", m)) => bail!("--publish {spec:?}: mode {m:?} (nat or preserve-source)"),
            Some(("published", p)) => port = Some(num(p, "published")?),
            Some(("target", p)) => target = Some(num(p, "target")?),
            Some((k, _)) => bail!("--publish {spec:?}: unknown key {k:?}"),
            None => match part.split_once(':') {
                Some(("", t)) => target = Some(num(t, "target")?),
                Some((p, t)) => {
                    port = Some(num(p, "published")?);
                    target = Some(num(t, "target")?);
                }
                None => bail!("--publish {spec:?}: expected PUB:TARGET"),
            },
        }
    }
    Ok((PublishRequest { port, mode }, target))
}

pub(crate) fn service(c: &Conn, cmd: &ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create { name, network, protocol, vip_port, target_port, publish, scheduler } => {
            let mut target = *target_port;
            let mut reqs = Vec::new();
            for p in publish {
                let (r, t) = parse_publish(p)?;
                if let (Some(a), Some(b)) = (target, t)
                    && a != b
                {
                    bail!("--publish {p:?}: target port {b} differs from {a} (a service has one target port)");
                }
                target = target.or(t);
                reqs.push(r);
            }
            let target_port = target.context("the tasks' port: --target-port or --publish PUB:TARGET")?;
            if vip_port.is_none() && reqs.is_empty() {
                bail!("a service needs a VIP (--vip-port) or a published port (--publish), or both");
            }
            let protocol = match protocol {
                ProtoArg::Tcp => Proto::Tcp,
                ProtoArg::Udp => Proto::Udp,
            };
            let scheduler = sched(*scheduler);
            write(
                c,
                Command::CreateService {
                    name: name.clone(),
                    network: network.clone(),
                    protocol,
                    vip_port: *vip_port,
                    target_port,
                    publish: reqs,
                    scheduler,
                },
            )?;
            let st = state(c)?;
            let svc = &st["services"][name];
            let published: Vec<String> = svc["published"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}->{target_port} ({})", s(&p["port"]), s(&p["mode"])))
                .collect();
            println!("{name}: vip {} published {}", vip_text(&svc["vip"]), published.join(", "));
        }
        ServiceCmd::Ls => {
            let st = state(c)?;
            print(c, &st["services"], |v| {
                let rows = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, sv)| {
                        let tasks = st["tasks"]
                            .as_object()
                            .map_or(0, |t| t.values().filter(|t| t["service"] == Value::String(k.clone())).count());
                        let published: Vec<String> = sv["published"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| format!("*:{}->{}/{}", s(&p["port"]), s(&sv["target_port"]), s(&p["mode"])))
                            .collect();
                        vec![
                            k.clone(),
                            s(&sv["network"]),
                            s(&sv["protocol"]),
                            vip_text(&sv["vip"]),
                            tasks.to_string(),
                            s(&sv["scheduler"]),
                            published.join(" "),
                        ]
                    })
                    .collect();
                table(&["NAME", "NETWORK", "PROTO", "VIP", "TASKS", "SCHED", "PORTS"], rows);
            });
        }
        ServiceCmd::Inspect { name } => {
            let st = state(c)?;
            let mut sv = st["services"].get(name).cloned().ok_or_else(|| anyhow!("no service {name:?}"))?;
            let tasks: Vec<Value> = st["tasks"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, t)| t["service"] == Value::String(name.clone()))
                .map(|(_, t)| t.clone())
                .collect();
            sv["tasks"] = Value::Array(tasks);
            println!("{}", serde_json::to_string_pretty(&sv)?);
        }
        ServiceCmd::Update { scheduler, publish_add, publish_rm, name } => {
            let st = state(c)?;
            let target = st["services"][name]["target_port"].as_u64();
            let mut add = Vec::new();
            for p in publish_add {
                let (r, t) = parse_publish(p)?;
                if let (Some(t), Some(want)) = (t, target)
                    && u64::from(t) != want
                {
                    bail!("--publish-add {p:?}: the service's target port is {want}, not {t}");
                }
                add.push(r);
            }
            if scheduler.is_none() && add.is_empty() && publish_rm.is_empty() {
                bail!("nothing to change: --scheduler, --publish-add or --publish-rm");
            }
            write(
                c,
                Command::UpdateService {
                    name: name.clone(),
                    scheduler: scheduler.map(sched),
                    publish_add: add,
                    publish_rm: publish_rm.clone(),
                },
            )?;
            println!("{name}");
        }
        ServiceCmd::Rm { name } => {
            write(c, Command::RemoveService { name: name.clone() })?;
            println!("{name}");
        }
    }
    Ok(())
}

fn sched(s: SchedArg) -> Scheduler {
    match s {
        SchedArg::Mh => Scheduler::Mh,
        SchedArg::Rr => Scheduler::Rr,
        SchedArg::Wrr => Scheduler::Wrr,
        SchedArg::Lc => Scheduler::Lc,
        SchedArg::Wlc => Scheduler::Wlc,
        SchedArg::Sh => Scheduler::Sh,
    }
}

fn vip_text(v: &Value) -> String {
    match v.as_array() {
        Some(a) if a.len() == 2 => format!("{}:{}", s(&a[0]), s(&a[1])),
        _ => "-".into(),
    }
}

pub(crate) fn task(c: &Conn, cmd: &TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::Attach { service, node, netns, weight, id } => {
            // Without --id: SERVICE.N, the lowest N free. This node's copy
            // of the state may lag the leader's: an id taken meanwhile is
            // skipped and the next one tried.
            let mut tried = std::collections::BTreeSet::new();
            let id = loop {
                let tid = match id {
                    Some(i) => i.clone(),
                    None => {
                        let st = state(c)?;
                        let free = |i: &String| st["tasks"].get(i).is_none() && !tried.contains(i);
                        (1..).map(|n| format!("{service}.{n}")).find(free).unwrap_or_default()
                    }
                };
                let cmd = Command::AttachTask {
                    id: tid.clone(),
                    service: service.clone(),
                    node: node.clone(),
                    weight: *weight,
                    netns: netns.clone(),
                };
                match write(c, cmd) {
                    Ok(()) => break tid,
                    Err(e) if id.is_none() && tried.len() < 8 && e.to_string().contains("already exists") => {
                        tried.insert(tid);
                    }
                    Err(e) => return Err(e),
                }
            };
            // The address, once this node's copy of the state has the task.
            let t0 = std::time::Instant::now();
            let ip = loop {
                let st = state(c)?;
                if let Some(ip) = st["tasks"][&id]["ip"].as_str() {
                    break ip.to_owned();
                }
                if t0.elapsed() > std::time::Duration::from_secs(3) {
                    break "(address not known here yet)".to_owned();
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            println!("{id}: {ip} on {node}");
        }
        TaskCmd::Ls { service } => {
            let st = state(c)?;
            let tasks: Vec<Value> = st["tasks"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, t)| t.clone())
                .filter(|t| service.as_ref().is_none_or(|sv| t["service"] == Value::String(sv.clone())))
                .collect();
            print(c, &Value::Array(tasks), |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        vec![s(&t["id"]), s(&t["service"]), s(&t["node"]), s(&t["ip"]), s(&t["weight"]), s(&t["netns"])]
                    })
                    .collect();
                table(&["ID", "SERVICE", "NODE", "ADDRESS", "WEIGHT", "NETNS"], rows);
            });
        }
        TaskCmd::Drain { id } => {
            write(c, Command::SetWeight { id: id.clone(), weight: 0 })?;
            println!("{id}");
        }
        TaskCmd::Detach { id } => {
            write(c, Command::DetachTask { id: id.clone() })?;
            println!("{id}");
        }
    }
    Ok(())
}

/// `meshplane stats`: per port, per worker, drops by reason, services.
pub(crate) fn stats(c: &Conn, watch: bool, count: Option<u32>) -> Result<()> {
    let mut prev: Option<(std::time::Instant, Value)> = None;
    let mut shown = 0u32;
    loop {
        let v = call(c, AdminRequest::Stats)?;
        let now = std::time::Instant::now();
        if c.format == Format::Json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            let dp = &v["dataplane"];
            // Per second since the previous print (with --watch).
            let per_sec = |path: &dyn Fn(&Value) -> Option<u64>, bits: bool| -> String {
                let Some((t, p)) = &prev else { return String::new() };
                match (path(dp), path(&p["dataplane"])) {
                    (Some(a), Some(b)) => {
                        let r = (a - b.min(a)) as f64 / t.elapsed().as_secs_f64();
                        if bits { human_rate(r * 8.0, "bps") } else { human_rate(r, "pps") }
                    }
                    _ => String::new(),
                }
            };
            let mut rows = Vec::new();
            for (w, wk) in dp["workers"].as_array().into_iter().flatten().enumerate() {
                for p in wk["traffic"].as_array().into_iter().flatten() {
                    let name = s(&p["port"]);
                    let at = |key: &'static str| {
                        let name = name.clone();
                        move |d: &Value| {
                            d["workers"][w]["traffic"]
                                .as_array()
                                .and_then(|ps| ps.iter().find(|x| x["port"] == name.as_str()))
                                .and_then(|x| x[key].as_u64())
                        }
                    };
                    let tx_full = wk["ports"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|x| x["name"] == name.as_str()))
                        .map_or(String::new(), |x| s(&x["tx_full"]));
                    rows.push(vec![
                        w.to_string(),
                        name.clone(),
                        s(&p["rx_packets"]),
                        per_sec(&at("rx_packets"), false),
                        per_sec(&at("rx_bytes"), true),
                        s(&p["tx_packets"]),
                        per_sec(&at("tx_packets"), false),
                        per_sec(&at("tx_bytes"), true),
                        tx_full,
                    ]);
                }
            }
            table(&["WORKER", "PORT", "RX", "RX PPS", "RX BPS", "TX", "TX PPS", "TX BPS", "TX FULL"], rows);
            // Services, summed over the workers.
            let mut svcs = std::collections::BTreeMap::<String, [u64; 3]>::new();
            let sum = |d: &Value| {
                let mut m = std::collections::BTreeMap::<String, [u64; 3]>::new();
                for wk in d["workers"].as_array().into_iter().flatten() {
                    for sv in wk["services"].as_array().into_iter().flatten() {
                        let e = m.entry(s(&sv["name"])).or_default();
                        e[0] += sv["new_connections"].as_u64().unwrap_or(0);
                        e[1] += sv["packets"].as_u64().unwrap_or(0);
                        e[2] += sv["bytes"].as_u64().unwrap_or(0);
                    }
                }
                m
            };
            svcs.extend(sum(dp));
            if !svcs.is_empty() {
                let before = prev.as_ref().map(|(t, p)| (t.elapsed().as_secs_f64(), sum(&p["dataplane"])));
                let rows = svcs
                    .iter()
                    .map(|(name, c)| {
                        let r = |i: usize, bits: bool| match &before {
                            Some((dt, b)) => {
                                let x = (c[i] - b.get(name).map_or(0, |v| v[i]).min(c[i])) as f64 / dt;
                                if bits { human_rate(x * 8.0, "bps") } else { human_rate(x, "/s") }
                            }
                            None => String::new(),
                        };
                        vec![name.clone(), c[0].to_string(), r(0, false), c[1].to_string(), r(1, false), r(2, true)]
                    })
                    .collect();
                println!();
                table(&["SERVICE", "CONNECTIONS", "CONN/S", "PACKETS", "PPS", "BPS"], rows);
            }
            let mut drops = std::collections::BTreeMap::<String, u64>::new();
            for wk in dp["workers"].as_array().into_iter().flatten() {
                for (k, n) in wk["drops"].as_object().into_iter().flatten() {
                    *drops.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
            println!();
            if drops.is_empty() {
                println!("drops: none");
            } else {
                table(&["DROP REASON", "FRAMES"], drops.into_iter().map(|(k, n)| vec![k, n.to_string()]).collect());
            }
            let g = &v["gossip"];
            println!(
                "\ngossip: {} members, {} sent, {} received, {} rejected (unknown key {}, bad tag {})",
                g["members"].as_array().map_or(0, Vec::len),
                s(&g["sent"]),
                s(&g["received"]),
                ["rejected_short", "rejected_unknown_key", "rejected_bad_tag", "rejected_undecodable"]
                    .iter()
                    .map(|k| g[*k].as_u64().unwrap_or(0))
                    .sum::<u64>(),
                s(&g["rejected_unknown_key"]),
                s(&g["rejected_bad_tag"]),
            );
        }
        shown += 1;
        if !watch || count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        prev = Some((now, v));
        std::thread::sleep(std::time::Duration::from_secs(1));
        if c.format == Format::Table {
            println!();
        }
    }
}

/// `meshplane conntrack ls`: the connections this node's workers track
/// (both directions of each), like `ipvsadm -Lnc`.
pub(crate) fn conntrack_ls(c: &Conn, service: Option<&str>) -> Result<()> {
    let v = call(c, AdminRequest::Conntrack)?;
    let rows: Vec<Value> =
        v.as_array().into_iter().flatten().filter(|e| service.is_none_or(|s| e["service"] == s)).cloned().collect();
    print(c, &Value::Array(rows), |v| {
        let rows = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                vec![
                    s(&e["proto"]).to_uppercase(),
                    s(&e["src"]),
                    s(&e["dst"]),
                    s(&e["direction"]),
                    s(&e["service"]),
                    s(&e["backend"]),
                    s(&e["state"]),
                    s(&e["expires_in_s"]),
                    s(&e["worker"]),
                ]
            })
            .collect();
        table(&["PRO", "SOURCE", "DESTINATION", "DIR", "SERVICE", "BACKEND", "STATE", "EXPIRES(S)", "WORKER"], rows);
    });
    Ok(())
}

/// A rate with a unit prefix: 1.2 Mpps, 840 kbps.
fn human_rate(x: f64, unit: &str) -> String {
    let (v, p) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    if p.is_empty() { format!("{v:.0} {unit}") } else { format!("{v:.1} {p}{unit}") }
}

/// `meshplane lb ls`: like `ipvsadm -Ln`: every balanced address of this
/// node with its scheduler, each backend with its weight and connections.
pub(crate) fn lb_ls(c: &Conn) -> Result<()> {
    let tables = call(c, AdminRequest::Tables)?;
    let stats = call(c, AdminRequest::Stats)?;
    let data_ip = s(&tables["node"]["data_ip"]);
    // Per service and backend address: (active, new connections), over
    // the workers.
    let mut conns = std::collections::BTreeMap::<(String, String), (u64, u64)>::new();
    for wk in stats["dataplane"]["workers"].as_array().into_iter().flatten() {
        for sv in wk["services"].as_array().into_iter().flatten() {
            for b in sv["backends"].as_array().into_iter().flatten() {
                let e = conns.entry((s(&sv["name"]), s(&b["ip"]))).or_default();
                e.0 += b["active"].as_u64().unwrap_or(0);
                e.1 += b["new_connections"].as_u64().unwrap_or(0);
            }
        }
    }
    if c.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "tables": tables, "stats": stats }))?);
        return Ok(());
    }
    println!("Prot LocalAddress:Port            Scheduler  Service");
    println!("  -> RemoteAddress:Port           Weight     ActiveConn NewConn");
    for sv in tables["service"].as_array().into_iter().flatten() {
        let name = s(&sv["name"]);
        let proto = s(&sv["protocol"]).to_uppercase();
        let target = s(&sv["target_port"]);
        let mut addrs = Vec::new();
        if let (Value::String(vip), Some(p)) = (&sv["vip"], sv["port"].as_u64()) {
            addrs.push(format!("{vip}:{p}"));
        }
        for p in sv["published"].as_array().into_iter().flatten() {
            addrs.push(format!("{data_ip}:{} ({})", s(&p["port"]), s(&p["mode"])));
        }
        for a in addrs {
            println!("{proto:<4} {a:<29} {:<10} {name}", s(&sv["scheduler"]));
            for b in sv["backend"].as_array().into_iter().flatten() {
                let ip = s(&b["ip"]);
                let (active, new) = conns.get(&(name.clone(), ip.clone())).copied().unwrap_or_default();
                println!("  -> {:<29} {:<10} {active:<10} {new}", format!("{ip}:{target}"), s(&b["weight"]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        let p = |s: &str| parse_publish(s).map(|(r, t)| (r.port, r.mode, t)).map_err(|e| e.to_string());
        assert_eq!(p("30080:8080"), Ok((Some(30080), MeshMode::Nat, Some(8080))));
        assert_eq!(p("mode=preserve-source,30081:8080"), Ok((Some(30081), MeshMode::PreserveSource, Some(8080))));
        assert_eq!(p("published=30082,target=80,mode=ingress"), Ok((Some(30082), MeshMode::Nat, Some(80))));
        assert_eq!(p(":8080"), Ok((None, MeshMode::Nat, Some(8080))));
        for (bad, says) in [
            ("70000:80", "bad published port"),
            ("30080:0", "bad target port"),
            ("mode=host,1:2", "mode \"host\""),
            ("colour=red", "unknown key"),
            ("8080", "PUB:TARGET"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
