//! A managed node's task ports: for a task with a network namespace, a
//! veth pair (AF_XDP) or a TAP device (TAP I/O) with one end in the task's
//! namespace, addressed, with its default route through the network's
//! gateway; removed when the task goes.

use super::args::{IoKind, RunArgs};
use super::workers::open;
use crate::sys::{self, ip};
use anyhow::{Context, Result};
use meshplane_control::cluster::LocalTask;
use meshplane_dataplane::io::Port;
use meshplane_dataplane::tables::Tables;

/// The name of a task's port on the node's side: `mpt` and a hash of the
/// task id (interface names are at most 15 bytes).
pub(crate) fn host_name(task: &str) -> String {
    let h = task.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("mpt{h:08x}")
}

/// A task port this node serves.
pub(crate) struct TaskPort {
    /// The interface on the node's side (veth) or the TAP device.
    pub(crate) iface: String,
    /// Made by this node (removed when the task goes).
    pub(crate) made: bool,
}

impl TaskPort {
    /// Removes its interface if this node made it.
    pub(crate) fn remove(&self) {
        if self.made {
            sys::link_del(&self.iface);
        }
    }
}

/// Makes the port of task `t` in its namespace and opens its `workers`
/// queues.
pub(crate) fn make(
    io: IoKind,
    workers: usize,
    args: &RunArgs,
    t: &LocalTask,
    tables: &Tables,
) -> Result<(TaskPort, Vec<Box<dyn Port>>)> {
    let Some(ns) = &t.netns else {
        // No namespace: an interface named after the task, wired up by
        // someone else, is served if it exists.
        let (qs, _) = open(io, &t.id, false, workers, tables, args)
            .with_context(|| format!("task {}: no --netns and no interface {:?}", t.id, t.id))?;
        return Ok((TaskPort { iface: t.id.clone(), made: false }, qs));
    };
    let host = host_name(&t.id);
    let peer = format!("{host}p");
    // A port left by a node that crashed goes first.
    sys::link_del(&host);
    let queues = match io {
        IoKind::Afxdp => veth(&host, &peer, ns, workers)
            .and_then(|()| open(io, &host, false, workers, tables, args))
            .map(|(q, _)| q)
            .inspect_err(|_| sys::link_del(&host))?,
        IoKind::Tap => {
            let (q, _) = open(io, &host, false, workers, tables, args)?;
            ip(&["link", "set", &host, "netns", ns])?;
            ip(&["-n", ns, "link", "set", &host, "name", &peer])?;
            q
        }
    };
    if let Err(e) = address(t, ns, &peer) {
        if io == IoKind::Afxdp {
            sys::link_del(&host);
        }
        return Err(e.context(format!("task {}: setting up its interface in {ns}", t.id)));
    }
    Ok((TaskPort { iface: host, made: io == IoKind::Afxdp }, queues))
}

/// A veth pair `host` - `peer` with `workers` queues each, `peer` in `ns`;
/// `host` up.
fn veth(host: &str, peer: &str, ns: &str, workers: usize) -> Result<()> {
    let n = workers.to_string();
    #[rustfmt::skip]
    ip(&["link", "add", host, "numrxqueues", &n, "numtxqueues", &n, "type", "veth",
         "peer", "name", peer, "numrxqueues", &n, "numtxqueues", &n, "netns", ns])?;
    ip(&["link", "set", host, "up"])
}

/// In the task's namespace: eth0 if it has none, its address, MAC, MTU,
/// the default route through the gateway. Transmit offloads stay on: a
/// TAP hands over super-frames and partial checksums with a virtio-net
/// header; on a veth (AF_XDP) the node completes the checksums.
fn address(t: &LocalTask, ns: &str, peer: &str) -> Result<()> {
    let name = if ip(&["-n", ns, "link", "set", peer, "name", "eth0"]).is_ok() { "eth0" } else { peer };
    let (mac, mtu, addr) = (t.mac.to_string(), t.mtu.to_string(), format!("{}/{}", t.ip, t.prefix));
    ip(&["-n", ns, "link", "set", name, "address", &mac, "mtu", &mtu, "up"])?;
    ip(&["-n", ns, "addr", "add", &addr, "dev", name])?;
    ip(&["-n", ns, "route", "replace", "default", "via", &t.gateway.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_port_names_fit_an_interface_name() {
        let a = host_name("web.1");
        assert!(a.len() <= 15 && a.starts_with("mpt"));
        assert_ne!(a, host_name("web.2"));
        assert_eq!(a, host_name("web.1"));
    }
}
