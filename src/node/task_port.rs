//! A managed node's task ports: for a task with a network namespace, a
//! veth pair (AF_XDP) or a TAP device (TAP I/O) with one end in the task's
//! namespace, addressed, with its default route through the network's
//! gateway; removed when the task goes.
//!
//! The namespace is a name (`ip netns`, entered with `ip -n NAME`) or a
//! process's (`/proc/PID/ns/net`, entered with `nsenter --net=…`), checked
//! again here ([`TaskNetns::parse`]; the state refuses anything else) and
//! refused if it is the node's own namespace or the host's: a task's port
//! never renames the node's interfaces or replaces its default route.
//! Every command is an argument vector.

use super::args::{IoKind, RunArgs};
use super::workers::open;
use crate::sys::{self, ip};
use anyhow::{Context, Result, bail};
use meshplane_control::cluster::LocalTask;
use meshplane_control::state::TaskNetns;
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
    let Some(given) = &t.netns else {
        // No namespace: an interface named after the task, wired up by
        // someone else, is served if it exists.
        let (qs, _) = open(io, &t.id, false, workers, tables, args)
            .with_context(|| format!("task {}: no --netns and no interface {:?}", t.id, t.id))?;
        return Ok((TaskPort { iface: t.id.clone(), made: false }, qs));
    };
    let ns = Netns::new(given).with_context(|| format!("task {}", t.id))?;
    let host = host_name(&t.id);
    let peer = format!("{host}p");
    // A port left by a node that crashed goes first.
    sys::link_del(&host);
    let queues = match io {
        IoKind::Afxdp => veth(&host, &peer, &ns, workers, t.mtu)
            .and_then(|()| open(io, &host, false, workers, tables, args))
            .map(|(q, _)| q)
            .inspect_err(|_| sys::link_del(&host))?,
        IoKind::Tap => {
            let (q, _) = open(io, &host, false, workers, tables, args)?;
            ip(&["link", "set", &host, "netns", &ns.target()])?;
            ns.ip(&["link", "set", &host, "name", &peer])?;
            q
        }
    };
    if let Err(e) = address(t, &ns, &peer) {
        if io == IoKind::Afxdp {
            sys::link_del(&host);
        }
        return Err(e.context(format!("task {}: setting up its interface in {}", t.id, ns.0)));
    }
    Ok((TaskPort { iface: host, made: io == IoKind::Afxdp }, queues))
}

/// A task's namespace, validated, and how to reach it.
struct Netns(TaskNetns);

impl Netns {
    /// `given` parsed, and refused if it is the node's own namespace or
    /// the host's (that of pid 1).
    fn new(given: &str) -> Result<Netns> {
        let ns = TaskNetns::parse(given)?;
        let id = |path: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
        };
        let task = id(&ns.path()).with_context(|| format!("no network namespace {ns}"))?;
        for (whose, path) in [("the node's own", "/proc/self/ns/net"), ("the host's", "/proc/1/ns/net")] {
            if id(path).is_ok_and(|x| x == task) {
                bail!("network namespace {ns} is {whose}: a task's port never goes there");
            }
        }
        Ok(Netns(ns))
    }

    /// What `ip link … netns` takes: the namespace's file for a name (a
    /// name of digits is never read as a pid), the pid for a process.
    fn target(&self) -> String {
        match &self.0 {
            TaskNetns::Named(_) => self.0.path(),
            TaskNetns::Process(pid) => pid.to_string(),
        }
    }

    /// Runs `ip args` in the namespace.
    fn ip(&self, args: &[&str]) -> Result<()> {
        match &self.0 {
            TaskNetns::Named(name) => {
                let mut v = vec!["-n", name.as_str()];
                v.extend_from_slice(args);
                ip(&v)
            }
            TaskNetns::Process(_) => sys::ip_in_netns_file(&self.0.path(), args),
        }
    }
}

/// A veth pair `host` - `peer` with `workers` queues each, `peer` in `ns`;
/// `host` up with the network's MTU (a veth drops what its receiving end's
/// MTU does not take).
fn veth(host: &str, peer: &str, ns: &Netns, workers: usize, mtu: u16) -> Result<()> {
    let n = workers.to_string();
    #[rustfmt::skip]
    ip(&["link", "add", host, "numrxqueues", &n, "numtxqueues", &n, "type", "veth",
         "peer", "name", peer, "numrxqueues", &n, "numtxqueues", &n, "netns", &ns.target()])?;
    ip(&["link", "set", host, "mtu", &mtu.to_string(), "up"])
}

/// In the task's namespace: eth0 if it has none, its address, MAC, MTU,
/// the default route through the gateway. Transmit offloads stay on: a
/// TAP hands over super-frames and partial checksums with a virtio-net
/// header; on a veth (AF_XDP) the node completes the checksums.
fn address(t: &LocalTask, ns: &Netns, peer: &str) -> Result<()> {
    let name = if ns.ip(&["link", "set", peer, "name", "eth0"]).is_ok() { "eth0" } else { peer };
    let (mac, mtu, addr) = (t.mac.to_string(), t.mtu.to_string(), format!("{}/{}", t.ip, t.prefix));
    ns.ip(&["link", "set", name, "address", &mac, "mtu", &mtu, "up"])?;
    ns.ip(&["addr", "add", &addr, "dev", name])?;
    ns.ip(&["route", "replace", "default", "via", &t.gateway.to_string()])
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

    #[test]
    fn the_nodes_own_namespace_and_bad_names_are_refused() {
        let own = format!("/proc/{}/ns/net", std::process::id());
        let e = Netns::new(&own).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("the node's own"), "{e}");
        let e = Netns::new("-all").err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("task namespace \"-all\""), "{e}");
        let e = Netns::new("mp-np-surely-absent").err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("no network namespace mp-np-surely-absent"), "{e}");
    }

    #[test]
    fn a_named_namespace_is_moved_to_by_its_file_and_a_process_by_its_pid() {
        assert_eq!(Netns(TaskNetns::Named("7".into())).target(), "/var/run/netns/7");
        assert_eq!(Netns(TaskNetns::Process(7)).target(), "7");
    }
}
