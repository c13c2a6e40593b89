//! The node's own processes reach its published ports, as on a Swarm node
//! (`curl http://127.0.0.1:PUB/` on the node, or to any of its addresses).
//! The routing mesh is in the dataplane, which the kernel's own
//! connections never cross; so an nftables table of the node's
//! (`meshplane-local`, in the node's network namespace) DNATs the node's
//! connections to a local address (`fib daddr type local`: 127.0.0.1 and
//! every address of the node) on a published port to meshplane's end of
//! the host link, and source-NATs them there to the kernel's end (a
//! loopback source may not leave, and the dataplane takes them from the
//! kernel's end only). The dataplane balances them as the routing mesh's
//! clients (`pipeline::from_host`) and answers over the link. `mp-host`
//! gets `route_localnet` (what lets a 127.0.0.1 connection be routed out
//! of it before its source is rewritten), as Docker sets it on `docker0`
//! without its userland proxy.
//!
//! The table is written whole with `nft -f -` (one transaction) when the
//! set of published ports changes, and deleted at stop. An error is
//! logged: the node runs on without it.

use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::tables::egress::HostLinkSpec;
use meshplane_dataplane::wire::ipv4::protocol;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The table's name.
const TABLE: &str = "meshplane-local";

/// The node's local-publishing rules.
pub(crate) struct LocalPublish {
    link: HostLinkSpec,
    /// The ports the table has now (TCP, UDP), `None` before the first.
    last: Mutex<Option<(Vec<u16>, Vec<u16>)>>,
}

impl LocalPublish {
    /// For the host link `link` (its device exists): `route_localnet` on it.
    pub(crate) fn start(link: &HostLinkSpec) -> LocalPublish {
        let p = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", link.port);
        if let Err(e) = std::fs::write(&p, "1") {
            tracing::warn!("local publishing: writing {p}: {e} (127.0.0.1:PUB will not reach the mesh)");
        }
        LocalPublish { link: link.clone(), last: Mutex::new(None) }
    }

    /// The rules for the published ports of `t`, if they changed.
    pub(crate) fn update(&self, t: &Tables) {
        let ports = published(t);
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_ref() == Some(&ports) {
            return;
        }
        match nft(&script(&self.link, &ports.0, &ports.1)) {
            Ok(()) => *last = Some(ports),
            Err(e) => tracing::warn!("local publishing: nft: {e}"),
        }
    }

    /// Deletes the table (at stop).
    pub(crate) fn stop(&self) {
        let _ = nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"));
    }
}

/// The published TCP and UDP ports of `t`, sorted.
fn published(t: &Tables) -> (Vec<u16>, Vec<u16>) {
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    for s in &t.services.list {
        for &(port, _) in &s.published {
            if s.proto == protocol::UDP { udp.push(port) } else { tcp.push(port) }
        }
    }
    tcp.sort_unstable();
    udp.sort_unstable();
    tcp.dedup();
    udp.dedup();
    (tcp, udp)
}

/// The whole table, replacing any older one in the same transaction.
fn script(link: &HostLinkSpec, tcp: &[u16], udp: &[u16]) -> String {
    let mut rules = String::new();
    for (proto, ports) in [("tcp", tcp), ("udp", udp)] {
        if !ports.is_empty() {
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            rules += &format!("        fib daddr type local {proto} dport {{ {list} }} dnat to {}\n", link.ip);
        }
    }
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n    \
         chain output {{\n        type nat hook output priority -100; policy accept;\n{rules}    }}\n    \
         chain postrouting {{\n        type nat hook postrouting priority 100; policy accept;\n        \
         oifname \"{dev}\" ct status dnat ip daddr {ip} snat to {peer}\n    }}\n}}\n",
        dev = link.port,
        ip = link.ip,
        peer = link.peer_ip,
    )
}

/// Runs `nft -f -` with `script` on its input.
fn nft(script: &str) -> std::io::Result<()> {
    let mut c = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(mut i) = c.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let o = c.wait_with_output()?;
    if o.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(String::from_utf8_lossy(&o.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_dnats_local_addresses_on_published_ports_to_the_link() {
        let link = crate::node::host_port::spec("198.18.250.4/30".parse().expect("subnet")).expect("link");
        let s = script(&link, &[30080, 30081], &[]);
        assert!(s.starts_with("add table ip meshplane-local\ndelete table ip meshplane-local\n"), "{s}");
        assert!(s.contains(&format!("fib daddr type local tcp dport {{ 30080, 30081 }} dnat to {}", link.ip)), "{s}");
        assert!(!s.contains("udp dport"), "no empty set: {s}");
        assert!(
            s.contains(&format!("oifname \"mp-host\" ct status dnat ip daddr {} snat to {}", link.ip, link.peer_ip))
        );
    }
}
