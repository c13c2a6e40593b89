//! A node configuration file (`--config node.toml`): its keys are the
//! long flags' names with `_`; flags given win.

use super::args::{IoKind, RunArgs};
use anyhow::{Context, Result};
use meshplane_dataplane::tables::egress::PortRange;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Keys of a node configuration file (`--config node.toml`): the long
/// flags' names with `_`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    advertise_addr: Option<String>,
    data_path_addr: Option<Ipv4Addr>,
    data_iface: Option<String>,
    data_mac: Option<String>,
    data_path_port: Option<u16>,
    data_path_mtu: Option<u16>,
    gossip_port: Option<u16>,
    metrics_addr: Option<String>,
    io: Option<IoKind>,
    cores: Option<Vec<usize>>,
    workers: Option<usize>,
    busy_poll: Option<bool>,
    spin_us: Option<u64>,
    worker_nice: Option<i32>,
    state_dir: Option<PathBuf>,
    conntrack: Option<usize>,
    max_new_conns_per_sec: Option<u32>,
    stats_file: Option<PathBuf>,
    egress_addr: Option<Ipv4Addr>,
    egress_ports: Option<PortRange>,
    no_egress: Option<bool>,
    host_link: Option<meshplane_dataplane::tables::Subnet>,
    no_host_link: Option<bool>,
    no_dns: Option<bool>,
    dns_ports: Option<PortRange>,
    dns_upstream: Option<Vec<String>>,
    mesh_addrs: Option<Vec<Ipv4Addr>>,
}

/// The arguments with the configuration file's values where no flag was
/// given.
pub(crate) fn with_config_file(a: &RunArgs) -> Result<RunArgs> {
    let mut a = a.clone();
    let Some(path) = &a.config else { return Ok(a) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: FileConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    a.name = a.name.or(f.name);
    a.advertise_addr = a.advertise_addr.or(f.advertise_addr);
    a.data_path_addr = a.data_path_addr.or(f.data_path_addr);
    a.uplink = a.uplink.or(f.data_iface);
    a.data_mac = a.data_mac.or(f.data_mac);
    a.data_path_port = a.data_path_port.or(f.data_path_port);
    a.data_path_mtu = a.data_path_mtu.or(f.data_path_mtu);
    a.gossip_port = a.gossip_port.or(f.gossip_port);
    a.metrics_addr = a.metrics_addr.or(f.metrics_addr);
    a.io = a.io.or(f.io);
    if a.cores.is_empty() && a.workers.is_none() {
        a.cores = f.cores.unwrap_or_default();
        a.workers = f.workers;
    }
    a.busy_poll |= f.busy_poll.unwrap_or(false);
    use meshplane_dataplane::worker::MAX_FD_SPIN_US;
    if let Some(us) = f.spin_us.filter(|&us| us > MAX_FD_SPIN_US) {
        anyhow::bail!("{}: spin_us = {us}: at most {MAX_FD_SPIN_US} (one second)", path.display());
    }
    a.spin_us = a.spin_us.or(f.spin_us);
    let nice = meshplane_dataplane::worker::WORKER_NICE_RANGE;
    if let Some(n) = f.worker_nice.filter(|n| !nice.contains(n)) {
        anyhow::bail!("{}: worker_nice = {n}: a nice value is {} to {}", path.display(), nice.start(), nice.end());
    }
    a.worker_nice = a.worker_nice.or(f.worker_nice);
    a.state_dir = a.state_dir.or(f.state_dir);
    if let Some(c) = f.conntrack {
        a.conntrack = c;
    }
    if let Some(n) = f.max_new_conns_per_sec {
        a.max_new_conns_per_sec = n;
    }
    a.stats_file = a.stats_file.or(f.stats_file);
    // Egress flags given win over the file's egress keys as a whole.
    if a.egress_addr.is_none() && a.egress_ports.is_none() && !a.no_egress {
        a.egress_addr = f.egress_addr;
        a.egress_ports = f.egress_ports;
        a.no_egress = f.no_egress.unwrap_or(false);
        if a.no_egress && (a.egress_addr.is_some() || a.egress_ports.is_some()) {
            anyhow::bail!("{}: no_egress = true with egress_addr or egress_ports", path.display());
        }
    }
    // Likewise the host link's.
    if a.host_link.is_none() && !a.no_host_link {
        a.host_link = f.host_link;
        a.no_host_link = f.no_host_link.unwrap_or(false);
        if a.no_host_link && a.host_link.is_some() {
            anyhow::bail!("{}: no_host_link = true with host_link", path.display());
        }
    }
    // Likewise the embedded DNS's.
    if a.dns_ports.is_none() && a.dns_upstream.is_empty() && !a.no_dns {
        a.no_dns = f.no_dns.unwrap_or(false);
        a.dns_ports = f.dns_ports;
        a.dns_upstream = f
            .dns_upstream
            .unwrap_or_default()
            .iter()
            .map(|u| super::dns::parse_upstream(u))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: dns_upstream: {e}", path.display()))?;
        if a.no_dns && (a.dns_ports.is_some() || !a.dns_upstream.is_empty()) {
            anyhow::bail!("{}: no_dns = true with dns_ports or dns_upstream", path.display());
        }
    }
    if a.mesh_addr.is_empty() {
        a.mesh_addr = f.mesh_addrs.unwrap_or_default();
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_flags_win() {
        let f: FileConfig = toml::from_str(include_str!("../../examples/node.toml")).expect("examples/node.toml");
        assert_eq!(f.name.as_deref(), Some("node1"));
        assert_eq!(f.io, Some(IoKind::Afxdp));
        assert_eq!(f.cores, Some(vec![1]));
        assert_eq!(f.spin_us, None, "commented out: the flag's default");
        let f: FileConfig = toml::from_str("spin_us = 250").expect("spin_us");
        assert_eq!(f.spin_us, Some(250));
        let f: FileConfig = toml::from_str(
            "egress_addr = \"198.18.0.7\"\negress_ports = \"62000-62999\"\nhost_link = \"198.18.250.4/30\"",
        )
        .expect("egress keys");
        assert_eq!(f.host_link.map(|s| s.to_string()), Some("198.18.250.4/30".to_owned()));
        assert_eq!(f.egress_addr, Some(Ipv4Addr::new(198, 18, 0, 7)));
        assert_eq!(f.egress_ports.map(|r| (r.lo, r.hi)), Some((62000, 62999)));
        let bad = toml::from_str::<FileConfig>("egress_ports = \"100-200\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("at least 1024")), "a bad range is refused");
        let f: FileConfig =
            toml::from_str("dns_ports = \"25000-25999\"\ndns_upstream = [\"198.18.30.10\", \"198.18.30.11:5353\"]")
                .expect("dns keys");
        assert_eq!(f.dns_ports.map(|r| (r.lo, r.hi)), Some((25000, 25999)));
        assert_eq!(f.dns_upstream.map(|v| v.len()), Some(2));
        let bad = toml::from_str::<FileConfig>("nmae = \"x\"");
        assert!(bad.is_err_and(|e| e.to_string().contains("nmae")), "an unknown key is refused by name");
    }

    /// A core past what a cpu set can name and
    /// an AF_XDP ring out of range: refused before anything starts.
    #[test]
    fn cores_and_rings_out_of_range_are_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        use crate::node::workers::worker_cores;
        use clap::Parser;
        let run = |flags: &[&str]| Cli::try_parse_from([&["x"][..], flags].concat()).map(|c| c.run);
        let e = worker_cores(&run(&["--cores", "1024"]).expect("parses")).expect_err("core 1024");
        assert!(format!("{e:#}").contains("--cores: core 1024 is past what a cpu set can name"), "{e:#}");
        let ok = worker_cores(&run(&["--cores", "0,1023"]).expect("parses")).expect("cores a set can name");
        assert_eq!(ok, vec![Some(0), Some(1023)]);
        for ring in ["2147483648", "32", "131072"] {
            assert!(run(&["--xdp-ring", ring]).is_err(), "--xdp-ring {ring} accepted");
        }
        assert_eq!(run(&["--xdp-ring", "4096"]).expect("in range").xdp_ring, 4096);
    }

    /// `spin_us` and `worker_nice`: the file's value where no flag was
    /// given, the flag's where one was (also when it equals the default),
    /// and a value out of range refused with its key named.
    #[test]
    fn spin_us_and_worker_nice_from_the_file_and_the_flag() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        use clap::Parser;
        let dir = std::env::temp_dir().join(format!("mp-spin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("node.toml");
        let args = |text: &str, flags: &[&str]| {
            std::fs::write(&file, text).expect("writing the file");
            let argv = [&["x", "--config", file.to_str().expect("utf-8 path")], flags].concat();
            with_config_file(&Cli::try_parse_from(argv).expect("flags").run)
        };
        let with = |text: &str, flags: &[&str]| args(text, flags).map(|a| a.spin_us);
        assert_eq!(with("", &[]).expect("no key"), None, "neither: the worker's default");
        assert_eq!(with("spin_us = 250", &[]).expect("file"), Some(250));
        assert_eq!(with("spin_us = 250", &["--spin-us", "100"]).expect("flag"), Some(100), "the flag wins");
        let err = with("spin_us = 2000000", &[]).expect_err("over a second");
        assert!(err.to_string().contains("spin_us = 2000000"), "{err}");
        assert!(Cli::try_parse_from(["x", "--spin-us", "1000001"]).is_err(), "the flag is bounded too");
        let nice = |text: &str, flags: &[&str]| args(text, flags).map(|a| a.worker_nice);
        assert_eq!(nice("", &[]).expect("no key"), None, "neither: the node's default");
        assert_eq!(nice("worker_nice = -5", &[]).expect("file"), Some(-5));
        assert_eq!(nice("worker_nice = -5", &["--worker-nice", "-10"]).expect("flag"), Some(-10), "the flag wins");
        assert_eq!(nice("", &["--worker-nice", "0"]).expect("zero"), Some(0));
        let err = nice("worker_nice = -21", &[]).expect_err("below -20");
        assert!(err.to_string().contains("worker_nice = -21"), "{err}");
        assert!(Cli::try_parse_from(["x", "--worker-nice", "20"]).is_err(), "the flag is bounded too");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
