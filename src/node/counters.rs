//! The node's statistics in the shared schema (`dataplane::report`), made from
//! the workers' last published counters and named from the tables in use:
//! for the stats file, and the admin API's `stats` and `conntrack`.

use crate::stats::{BackendStats, ConntrackEntry, NodeStats, PortStats, ServiceStats, Traffic, WorkerStats};
use meshplane_dataplane::lb::conntrack::CtState;
use meshplane_dataplane::packet::DropReason;
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::worker::{Report, Shared};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Every worker's last published counters: ports, drops by reason,
/// connection table, and per service and backend.
pub(crate) fn node_stats(shared: &Arc<Shared>) -> NodeStats {
    let t = shared.tables();
    let workers = (0..shared.workers()).filter_map(|i| shared.report(i)).map(|r| worker_stats(&r, &t)).collect();
    NodeStats { tables_version: shared.version(), workers, dns: None }
}

fn worker_stats(r: &Report, t: &Tables) -> WorkerStats {
    let ports =
        r.io.iter()
            .map(|(n, s)| PortStats {
                name: n.clone(),
                rx: s.rx,
                tx: s.tx,
                tx_full: s.tx_full,
                rx_oversize: s.rx_oversize,
                rx_bad_offload: s.rx_bad_offload,
                tx_segmented: s.tx_segmented,
                tx_coalesced: s.tx_coalesced,
                rx_kernel_dropped: s.rx_kernel_dropped,
                errors: s.errors,
            })
            .collect();
    let drops = r
        .stats
        .as_ref()
        .map(|s| DropReason::ALL.iter().map(|d| (d.name().to_owned(), s.dropped(*d))).filter(|(_, n)| *n > 0).collect())
        .unwrap_or_default();
    let traffic = r
        .stats
        .as_ref()
        .map(|st| {
            st.ports
                .iter()
                .zip(&t.ports)
                .map(|(c, p)| Traffic {
                    port: p.name.clone(),
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                })
                .collect()
        })
        .unwrap_or_default();
    WorkerStats {
        tables_version: r.tables_version,
        ports,
        drops,
        passed: r.stats.as_ref().map_or(0, |s| s.passed),
        unbound: r.unbound,
        conntrack_entries: r.conntrack_len as u64,
        conntrack_unconfirmed: r.conntrack.unconfirmed,
        conntrack_confirmed: r.conntrack.confirmed,
        conntrack_guarded: r.conntrack.guarded,
        conntrack_evicted: r.conntrack.evicted,
        mesh_frag_needed: r.mesh.frag_needed,
        mesh_mss_clamped: r.mesh.mss_clamped,
        egress: r.egress,
        new_connections: r.services.iter().map(|s| s.new_conns).sum(),
        handed_off: r.handed_off,
        handed_in: r.handed_in,
        handoff_full: r.handoff_full,
        busy_rounds: r.busy_rounds,
        idle_waits: r.idle_waits,
        spin_yields: r.spin_yields,
        services: service_stats(r, t),
        traffic,
    }
}

fn service_stats(r: &Report, t: &Tables) -> Vec<ServiceStats> {
    r.services
        .iter()
        .zip(&t.services.list)
        .map(|(c, s)| ServiceStats {
            name: s.name.clone(),
            packets: c.packets,
            bytes: c.bytes,
            new_connections: c.new_conns,
            backends: c
                .backends
                .iter()
                .zip(&s.backends)
                .map(|(c, b)| BackendStats {
                    ip: b.ip,
                    port: b.port,
                    weight: b.weight,
                    packets: c.packets,
                    bytes: c.bytes,
                    new_connections: c.new_conns,
                    active: c.active,
                })
                .collect(),
        })
        .collect()
}

/// Writes the counters to `file` (through a temporary file, renamed).
pub(crate) fn write_stats(file: &Path, shared: &Arc<Shared>) {
    let doc = node_stats(shared);
    let tmp = file.with_extension("tmp");
    let ok = serde_json::to_vec_pretty(&doc)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = ok {
        tracing::warn!("writing {}: {e}", file.display());
    }
}

/// The connections every worker tracks, both directions of each.
pub(crate) fn conntrack_entries(shared: &Arc<Shared>) -> Vec<ConntrackEntry> {
    let t = shared.tables();
    let dumps = shared.conntrack(Duration::from_millis(500));
    let mut out = Vec::new();
    for (w, entries) in dumps.iter().enumerate() {
        for e in entries {
            let (k, v) = (&e.key, &e.value);
            let egress = v.flags & meshplane_dataplane::lb::CT_EGRESS != 0;
            let svc = t.services.list.get(v.service as usize).filter(|_| !egress);
            let reply = v.flags & meshplane_dataplane::lb::CT_REPLY != 0;
            let backend = svc
                .and_then(|s| s.backends.get(v.backend as usize))
                .map(|b| format!("{}:{}", b.ip, b.port))
                .unwrap_or_default();
            let service = if egress { Some("egress".to_owned()) } else { svc.map(|s| s.name.clone()) };
            out.push(ConntrackEntry {
                worker: w,
                proto: (if k.proto == 6 {
                    "tcp"
                } else if k.proto == 17 {
                    "udp"
                } else if k.proto == 1 {
                    "icmp"
                } else {
                    "other"
                })
                .to_owned(),
                src: format!("{}:{}", Ipv4Addr::from(k.src), k.sport),
                dst: format!("{}:{}", Ipv4Addr::from(k.dst), k.dport),
                direction: (if reply { "reply" } else { "forward" }).to_owned(),
                service,
                backend,
                state: state_name(v.state).to_owned(),
                expires_in_s: e.expires_in / 1_000_000_000,
            });
        }
    }
    out
}

fn state_name(s: CtState) -> &'static str {
    match s {
        CtState::Udp => "udp",
        CtState::SynRecv => "syn_recv",
        CtState::Established => "established",
        CtState::Fin => "fin_wait",
        CtState::Close => "close",
        CtState::Unconfirmed => "unconfirmed",
        CtState::Icmp => "icmp",
        CtState::Dns => "dns",
    }
}
