//! The host link: how a task reaches its own node's host (a service
//! listening on the node's data address, as Swarm's `docker_gwbridge`
//! gateway makes it reachable). A frame meshplane sends out of an AF_XDP
//! or TAP uplink goes to the wire, never back up the node's own stack, so
//! the node opens an exception path of its own into its kernel: a TAP
//! device (`mp-host`) in the node's namespace, whose kernel end holds the
//! link's peer address (a /30), with a permanent neighbour entry for
//! meshplane's end (the kernel never has to ARP for it) and no IPv6. The
//! dataplane source-NATs tasks' connections to the host to meshplane's end
//! of the link, so the host answers through the link's connected route
//! (`lb::egress`). The same for both uplink kinds.

use super::args::{IoKind, RunArgs};
use super::workers::open;
use crate::sys::{self, ip};
use anyhow::{Context, Result, bail};
use meshplane_dataplane::io::Port;
use meshplane_dataplane::tables::egress::HostLinkSpec;
use meshplane_dataplane::tables::{Subnet, Tables, node_mac_for};
use std::net::Ipv4Addr;

/// The host link's default /30 (link-local, as Docker's gwbridge default
/// address is private).
pub(crate) const DEFAULT_LINK: Subnet = Subnet { addr: Ipv4Addr::new(169, 254, 77, 0), prefix: 30 };

/// A managed node's host link: `--host-link` (default [`DEFAULT_LINK`])
/// unless `--no-host-link` or egress is off. With a TAP uplink the kernel
/// does not hold the data-path address: connections to it go to the
/// kernel's end of the link.
pub(crate) fn managed(a: &RunArgs, io: IoKind, egress: bool) -> Result<Option<HostLinkSpec>> {
    if a.no_host_link || !egress {
        return Ok(None);
    }
    let mut h = spec(a.host_link.unwrap_or(DEFAULT_LINK))?;
    h.dnat_data_ip = io == IoKind::Tap;
    Ok(Some(h))
}

/// The host link's addresses from its /30 (`--host-link`): the kernel's
/// end is the first host address, meshplane's the second.
pub(crate) fn spec(link: Subnet) -> Result<HostLinkSpec> {
    if link.prefix != 30 {
        bail!("--host-link {link}: a /30 is needed (two addresses: the kernel's end and meshplane's)");
    }
    let base = u32::from(link.addr);
    let (peer_ip, ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
    Ok(HostLinkSpec {
        ip,
        peer_ip,
        mac: node_mac_for(ip),
        peer_mac: node_mac_for(peer_ip),
        port: meshplane_dataplane::tables::egress::DEFAULT_HOST_PORT.to_owned(),
        dnat_data_ip: false,
    })
}

/// Opens the host link's TAP device (one queue per worker), gives its
/// kernel end its address, MAC and MTU and a permanent neighbour entry for
/// meshplane's end. A device left by a node that crashed goes first.
pub(crate) fn open_link(
    link: &HostLinkSpec,
    mtu: u16,
    workers: usize,
    tables: &Tables,
    args: &RunArgs,
) -> Result<Vec<Box<dyn Port>>> {
    let dev = link.port.as_str();
    sys::link_del(dev);
    let (queues, _) = open(IoKind::Tap, dev, false, workers, tables, args)
        .with_context(|| format!("opening the host link's TAP device {dev}"))?;
    let setup = || -> Result<()> {
        ip(&["link", "set", dev, "address", &link.peer_mac.to_string(), "mtu", &mtu.to_string()])?;
        // The kernel's end speaks IPv4 only: no router solicitations or
        // MLD reports for the dataplane to drop.
        let v6 = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
        if std::path::Path::new(&v6).exists() {
            std::fs::write(&v6, "1").with_context(|| format!("writing {v6}"))?;
        }
        ip(&["addr", "replace", &format!("{}/30", link.peer_ip), "dev", dev])?;
        ip(&["link", "set", dev, "up"])?;
        ip(&["neigh", "replace", &link.ip.to_string(), "lladdr", &link.mac.to_string(), "dev", dev, "nud", "permanent"])
    };
    if let Err(e) = setup() {
        sys::link_del(dev);
        return Err(e.context(format!("setting up the host link {dev}")));
    }
    tracing::info!(
        "host link {dev}: the kernel's end {}, meshplane's {} (tasks reach this host from there)",
        link.peer_ip,
        link.ip
    );
    Ok(queues)
}

/// Removes the host link's device (at exit).
pub(crate) fn close_link(link: &HostLinkSpec) {
    sys::link_del(&link.port);
}
