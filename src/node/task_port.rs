//! A managed node's task ports: for a task with a network namespace, a
//! veth pair (AF_XDP) or a TAP device (TAP I/O) with one end in the task's
//! namespace, addressed, with its default route through the network's
//! gateway; removed when the task goes.
//!
//! The namespace is a name (`ip netns`, entered with `ip -n NAME`), a
//! process's (`/proc/PID/ns/net`) or another namespace file (a runtime's
//! bind mount), the last two entered with `nsenter --net=…`. It is checked
//! again here ([`TaskNetns::parse`]; the state refuses anything else), must
//! be a network namespace (a file of nsfs), and is refused if it is the
//! node's own namespace or the host's: a task's port never renames the
//! node's interfaces or replaces its default route. A container's task
//! (CNI, `task attach --pid`) records the namespace's inode: a
//! `/proc/PID` whose pid now belongs to another process is refused, and
//! its port gets the interface name the runtime asked for. Every command
//! is an argument vector.

use super::args::{IoKind, RunArgs};
use super::workers::open;
use crate::sys::{self, ip};
use anyhow::{Context, Result, bail};
use meshplane_cni::failure::Failure;
use meshplane_control::cluster::LocalTask;
use meshplane_control::state::TaskNetns;
use meshplane_dataplane::io::Port;
use meshplane_dataplane::tables::{Network, Tables};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

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
    /// The resolv.conf this node wrote for the task's named namespace
    /// (removed when the task goes).
    pub(crate) resolv: Option<PathBuf>,
}

impl TaskPort {
    /// Removes its interface if this node made it, and the resolv.conf it
    /// wrote (and its directory, if that is left empty).
    pub(crate) fn remove(&self) {
        if self.made {
            sys::link_del(&self.iface);
        }
        if let Some(p) = &self.resolv {
            if let Err(e) = std::fs::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing {}: {e}", p.display());
            }
            if let Some(dir) = p.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// The first line of every resolv.conf this node writes (a file without it
/// is someone else's, and left alone).
const RESOLV_MARK: &str = "# meshplane:";

/// Writes `dir/resolv.conf` for task `task` of `network` (`ip netns exec`
/// mounts `/etc/netns/NAME/resolv.conf` over `/etc/resolv.conf`): the
/// network's gateway as the resolver, the node's own `search` line,
/// `options ndots:0`. The directory is made 0755 if missing, the file 0644
/// through a temporary file renamed. A file already there without our
/// first line is left alone (`None`, with a warning).
pub(crate) fn resolv_conf(
    dir: &Path,
    task: &str,
    network: &str,
    gateway: Ipv4Addr,
    search: Option<&str>,
) -> Result<Option<PathBuf>> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = dir.join("resolv.conf");
    if let Ok(old) = std::fs::read_to_string(&path)
        && !old.starts_with(RESOLV_MARK)
    {
        tracing::warn!("{} has a resolv.conf of its own; not replaced", path.display());
        return Ok(None);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("making {}", dir.display()))?;
    let search = search.map(|s| format!("search {s}\n")).unwrap_or_default();
    let text = format!(
        "{RESOLV_MARK} task {task} in network {network} (removed when the task goes)\nnameserver {gateway}\n{search}options ndots:0\n"
    );
    let tmp = dir.join(".resolv.conf.meshplane");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, &path)
    };
    write().with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// For a task in a named namespace of a network this node serves DNS for
/// (its `dns_port` set in `tables`): its resolv.conf in
/// `/etc/netns/NAME/`. A failure is logged: the task runs without it.
fn task_resolv(t: &LocalTask, tables: &Tables) -> Option<PathBuf> {
    let TaskNetns::Named(name) = TaskNetns::parse(t.netns.as_deref()?).ok()? else { return None };
    let nw = dns_network(t, tables)?;
    let search = node_search();
    let dir = Path::new("/etc/netns").join(&name);
    resolv_conf(&dir, &t.id, &nw.name, t.gateway, search.as_deref())
        .inspect_err(|e| tracing::warn!("task {}: {e:#}", t.id))
        .ok()
        .flatten()
}

/// The network of task `t` whose embedded DNS this node serves (a port
/// is given for it), if any.
pub(crate) fn dns_network<'a>(t: &LocalTask, tables: &'a Tables) -> Option<&'a Network> {
    tables.networks.iter().find(|n| n.gateway_ip == t.gateway && n.dns_port.is_some())
}

/// The domains of this node's `/etc/resolv.conf` `search` line, if any:
/// handed on to the tasks it serves DNS for.
pub(crate) fn node_search() -> Option<String> {
    std::fs::read_to_string("/etc/resolv.conf").ok().and_then(|s| super::dns::search(&s))
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
        return Ok((TaskPort { iface: t.id.clone(), made: false, resolv: None }, qs));
    };
    let ino = t.container.as_ref().and_then(|c| c.netns_ino);
    let ns = Netns::new(given, ino).map_err(anyhow::Error::new).with_context(|| format!("task {}", t.id))?;
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
        return Err(e.context(format!("task {}: setting up its interface in {}", t.id, ns.ns)));
    }
    let resolv = task_resolv(t, tables);
    Ok((TaskPort { iface: host, made: io == IoKind::Afxdp, resolv }, queues))
}

/// A task's namespace, validated, and how to reach it.
pub(crate) struct Netns {
    ns: TaskNetns,
    /// Its inode.
    pub(crate) ino: u64,
}

impl Netns {
    /// `given` parsed, checked to be a network namespace (nsfs), and
    /// refused if it is the node's own namespace or the host's (that of
    /// pid 1), or if its inode is not `ino` (a pid reused by another
    /// process).
    pub(crate) fn new(given: &str, ino: Option<u64>) -> Result<Netns, Failure> {
        let bad = |why: String| Failure::Netns { netns: given.to_owned(), why };
        let ns = TaskNetns::parse(given).map_err(|e| bad(e.to_string()))?;
        let id = |path: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
        };
        let task = match id(&ns.path()) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad("no such namespace (is gone: did the container exit?)".into()));
            }
            Err(e) => return Err(bad(format!("cannot be read: {e}"))),
        };
        // Every network namespace is a file of one nsfs superblock.
        let nsfs = id("/proc/self/ns/net").map_err(|e| bad(format!("reading this node's namespace: {e}")))?;
        if task.0 != nsfs.0 {
            return Err(bad("is not a network namespace".into()));
        }
        for (whose, path) in [("the node's own", "/proc/self/ns/net"), ("the host's", "/proc/1/ns/net")] {
            if id(path).is_ok_and(|x| x == task) {
                return Err(bad(format!("is {whose}: a task's port never goes there")));
            }
        }
        if let Some(want) = ino
            && want != task.1
        {
            return Err(bad("is now another namespace (the container is gone and its pid or path reused)".into()));
        }
        Ok(Netns { ns, ino: task.1 })
    }

    /// What `ip link … netns` takes: the namespace's file for a name (a
    /// name of digits is never read as a pid) or a file, the pid for a
    /// process.
    fn target(&self) -> String {
        match &self.ns {
            TaskNetns::Named(_) | TaskNetns::File(_) => self.ns.path(),
            TaskNetns::Process(pid) => pid.to_string(),
        }
    }

    /// Runs `ip args` in the namespace.
    fn ip(&self, args: &[&str]) -> Result<()> {
        match &self.ns {
            TaskNetns::Named(name) => {
                let mut v = vec!["-n", name.as_str()];
                v.extend_from_slice(args);
                ip(&v)
            }
            TaskNetns::Process(_) | TaskNetns::File(_) => sys::ip_in_netns_file(&self.ns.path(), args),
        }
    }

    /// Runs `ip args` in the namespace; its output, or why it failed.
    fn ip_output(&self, args: &[&str]) -> Result<String> {
        let path = format!("--net={}", self.ns.path());
        let mut v = vec![path.as_str(), "ip"];
        v.extend_from_slice(args);
        let out = std::process::Command::new("nsenter").args(&v).output().context("running nsenter")?;
        if !out.status.success() {
            bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether interface `ifname` exists in the namespace.
    pub(crate) fn has_link(&self, ifname: &str) -> bool {
        self.ip_output(&["link", "show", "dev", ifname]).is_ok()
    }
}

/// CNI ADD, before anything is written: `netns` is a namespace a task's
/// port may go into and has no interface `ifname`; its inode.
pub(crate) fn check_netns(netns: &str, ifname: &str) -> Result<u64, Failure> {
    let ns = Netns::new(netns, None)?;
    if ns.has_link(ifname) {
        return Err(Failure::Ifname { ifname: ifname.to_owned(), netns: netns.to_owned() });
    }
    Ok(ns.ino)
}

/// CNI CHECK: task `t`'s interface in its namespace is up, has its MAC and
/// its address.
pub(crate) fn verify(t: &LocalTask) -> Result<(), Failure> {
    let given = t.netns.as_deref().ok_or_else(|| Failure::Mismatch(format!("task {} has no namespace", t.id)))?;
    let ns = Netns::new(given, t.container.as_ref().and_then(|c| c.netns_ino))?;
    let ifname = t.ifname().unwrap_or("eth0");
    let out = ns
        .ip_output(&["-j", "addr", "show", "dev", ifname])
        .map_err(|e| Failure::Mismatch(format!("{ifname} in {given}: {e:#}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| Failure::Mismatch(format!("{ifname} in {given}: ip -j: {e}")))?;
    let link = &v[0];
    let up = link["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP"));
    if !up {
        return Err(Failure::Mismatch(format!("{ifname} in {given} is down")));
    }
    let mac = t.mac.to_string();
    if link["address"].as_str() != Some(mac.as_str()) {
        return Err(Failure::Mismatch(format!(
            "{ifname} in {given} has MAC {}, not {mac}",
            link["address"].as_str().unwrap_or("none")
        )));
    }
    let want = t.ip.to_string();
    let has = link["addr_info"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["local"].as_str() == Some(want.as_str()) && x["prefixlen"].as_u64() == Some(u64::from(t.prefix)))
    });
    if !has {
        return Err(Failure::Mismatch(format!("{ifname} in {given} has no address {want}/{}", t.prefix)));
    }
    Ok(())
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
    let name = match t.ifname() {
        // A runtime asked for this name: it must be that.
        Some(want) => {
            ns.ip(&["link", "set", peer, "name", want])
                .map_err(|_| Failure::Ifname { ifname: want.to_owned(), netns: ns.ns.to_string() })?;
            // ctr leaves the container's loopback down.
            ns.ip(&["link", "set", "lo", "up"])?;
            want
        }
        None if ns.ip(&["link", "set", peer, "name", "eth0"]).is_ok() => "eth0",
        None => peer,
    };
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
        let e = Netns::new(&own, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("the node's own"), "{e}");
        let e = Netns::new("-all", None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("task namespace \"-all\""), "{e}");
        let e = Netns::new("mp-np-surely-absent", None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("network namespace mp-np-surely-absent: no such namespace"), "{e}");
        // A regular file is not a namespace.
        let e = Netns::new("/etc/hostname", None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("is not a network namespace"), "{e}");
    }

    #[test]
    fn a_named_namespace_is_moved_to_by_its_file_and_a_process_by_its_pid() {
        let n = |ns| Netns { ns, ino: 0 };
        assert_eq!(n(TaskNetns::Named("7".into())).target(), "/var/run/netns/7");
        assert_eq!(n(TaskNetns::Process(7)).target(), "7");
        assert_eq!(n(TaskNetns::File("/run/user/0/netns/x".into())).target(), "/run/user/0/netns/x");
    }

    /// A namespace `mp-ds-…` of this test's own and its /etc/netns
    /// directory, removed when dropped (also on failure).
    struct Ns(String);

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.0));
        }
    }

    #[test]
    fn resolv_conf_is_what_the_namespace_sees_and_goes_with_the_task() {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
            eprintln!("skipped: resolv_conf_is_what_the_namespace_sees_and_goes_with_the_task needs root (ip netns)");
            return;
        }
        let ns = Ns(format!("mp-ds-rc{}", std::process::id() % 100_000));
        let ok = std::process::Command::new("ip").args(["netns", "add", &ns.0]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {}", ns.0);
        let dir = Path::new("/etc/netns").join(&ns.0);
        let gw = Ipv4Addr::new(198, 19, 0, 254);
        let path = resolv_conf(&dir, "web.1", "app", gw, Some("example.com")).expect("written").expect("ours");
        let seen = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "cat", "/etc/resolv.conf"])
            .output()
            .expect("ip netns exec");
        let seen = String::from_utf8_lossy(&seen.stdout).into_owned();
        assert_eq!(
            seen,
            "# meshplane: task web.1 in network app (removed when the task goes)\nnameserver 198.19.0.254\nsearch example.com\noptions ndots:0\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777).ok(), Some(0o644));
        // Written again (a restarted node): ours, replaced.
        assert!(resolv_conf(&dir, "web.1", "app", gw, None).expect("again").is_some());
        let port = TaskPort { iface: "mp-ds-none".into(), made: false, resolv: Some(path.clone()) };
        port.remove();
        assert!(!path.exists() && !dir.exists(), "the file and its empty directory went with the task");
        // Someone else's file stays as it is.
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("resolv.conf"), "nameserver 198.18.30.10\n").expect("write");
        assert!(resolv_conf(&dir, "web.2", "app", gw, None).expect("no error").is_none());
        assert_eq!(std::fs::read_to_string(dir.join("resolv.conf")).ok().as_deref(), Some("nameserver 198.18.30.10\n"));
    }
}
