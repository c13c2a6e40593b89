//! `meshplane stats`: per port and worker, services, drops by reason,
//! gossip, health checks, CNI requests; with `--watch`, again every second with rates.

use super::args::{Conn, Format};
use super::client;
use super::render::{human_rate, rate, table};
use crate::stats::{AdminStats, NodeStats};
use anyhow::Result;
use meshplane_control::rpc::CniStats;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The previous print: when, and what it showed.
type Previous = Option<(Instant, AdminStats)>;

/// Prints the node's counters (again every second with `watch`, at most
/// `count` times).
pub(crate) fn run(c: &Conn, watch: bool, count: Option<u32>) -> Result<()> {
    let mut prev: Previous = None;
    let mut shown = 0u32;
    loop {
        let v = client::stats(c)?;
        let now = Instant::now();
        if c.format == Format::Json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            ports(&v.dataplane, &prev);
            services(&v.dataplane, &prev);
            drops(&v.dataplane);
            egress(&v.dataplane);
            dns(&v.dataplane);
            let g = v.gossip.clone().unwrap_or_default();
            println!(
                "\ngossip: {} members, {} sent, {} received, {} rejected (unknown key {}, retired key {}, bad tag {}, wrong sender {}, replayed {})",
                g.members.len(),
                g.sent,
                g.received,
                g.rejected(),
                g.rejected_unknown_key,
                g.rejected_retired_key,
                g.rejected_bad_tag,
                g.rejected_wrong_sender,
                g.rejected_replayed,
            );
            if let Some(m) = &v.management {
                println!(
                    "management plane: {} connections open, {} accepted, {} requests, {} closed by limits (refused at accept {}, per address {}, handshake deadline {}, handshake failed {}, request deadline {}, idle {}, too large {}, expired certificate {})",
                    m.open,
                    m.accepted,
                    m.requests,
                    m.closed_by_limits(),
                    m.refused_total,
                    m.refused_per_ip,
                    m.handshake_timeouts,
                    m.handshake_failed,
                    m.request_timeouts,
                    m.idle_closed,
                    m.too_large,
                    m.expired_closed,
                );
            }
            if let Some(h) = &v.health {
                println!(
                    "health checks: {} tasks checked, {} probes, {} failed, {} to healthy, {} to unhealthy, {} proposed ({} errors)",
                    h.tasks, h.checks, h.failures, h.to_healthy, h.to_unhealthy, h.proposed, h.propose_errors,
                );
            }
            if let Some(line) = cni_line(&v.cni) {
                println!("{line}");
            }
        }
        shown += 1;
        if !watch || count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        prev = Some((now, v));
        std::thread::sleep(Duration::from_secs(1));
        if c.format == Format::Table {
            println!();
        }
    }
}

/// Per worker and port: frames, and rates since the previous print.
fn ports(dp: &NodeStats, prev: &Previous) {
    let mut rows = Vec::new();
    for (w, wk) in dp.workers.iter().enumerate() {
        for p in &wk.traffic {
            let before = prev
                .as_ref()
                .and_then(|(t, b)| Some((t, b.dataplane.workers.get(w)?.traffic.iter().find(|x| x.port == p.port)?)));
            let per_sec = |now: u64, then: fn(&crate::stats::Traffic) -> u64, bits: bool| match before {
                Some((t, b)) => {
                    let r = rate(now, then(b), t.elapsed().as_secs_f64());
                    if bits { human_rate(r * 8.0, "bps") } else { human_rate(r, "pps") }
                }
                None => String::new(),
            };
            let tx_full = wk.ports.iter().find(|x| x.name == p.port).map_or(String::new(), |x| x.tx_full.to_string());
            rows.push(vec![
                w.to_string(),
                p.port.clone(),
                p.rx_packets.to_string(),
                per_sec(p.rx_packets, |b| b.rx_packets, false),
                per_sec(p.rx_bytes, |b| b.rx_bytes, true),
                p.tx_packets.to_string(),
                per_sec(p.tx_packets, |b| b.tx_packets, false),
                per_sec(p.tx_bytes, |b| b.tx_bytes, true),
                tx_full,
            ]);
        }
    }
    table(&["WORKER", "PORT", "RX", "RX PPS", "RX BPS", "TX", "TX PPS", "TX BPS", "TX FULL"], rows);
}

/// Per service, summed over the workers: new connections, packets, bytes.
fn service_sums(dp: &NodeStats) -> BTreeMap<String, [u64; 3]> {
    let mut m = BTreeMap::<String, [u64; 3]>::new();
    for sv in dp.workers.iter().flat_map(|w| &w.services) {
        let e = m.entry(sv.name.clone()).or_default();
        e[0] += sv.new_connections;
        e[1] += sv.packets;
        e[2] += sv.bytes;
    }
    m
}

/// Services, summed over the workers, with rates since the previous print.
fn services(dp: &NodeStats, prev: &Previous) {
    let svcs = service_sums(dp);
    if svcs.is_empty() {
        return;
    }
    let before = prev.as_ref().map(|(t, p)| (t.elapsed().as_secs_f64(), service_sums(&p.dataplane)));
    let rows = svcs
        .iter()
        .map(|(name, c)| {
            let r = |i: usize, bits: bool| match &before {
                Some((dt, b)) => {
                    let x = rate(c[i], b.get(name).map_or(0, |v| v[i]), *dt);
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

/// The egress counters, summed over the workers (nothing if egress never
/// carried anything).
fn egress(dp: &NodeStats) {
    let mut e = meshplane_dataplane::lb::egress::EgressStats::default();
    for w in &dp.workers {
        let x = &w.egress;
        e.new_conns += x.new_conns;
        e.tx_packets += x.tx_packets;
        e.tx_bytes += x.tx_bytes;
        e.rx_packets += x.rx_packets;
        e.rx_bytes += x.rx_bytes;
        e.icmp_in += x.icmp_in;
        e.icmp_out += x.icmp_out;
        e.time_exceeded += x.time_exceeded;
        e.alloc_slow += x.alloc_slow;
    }
    if e.new_conns + e.tx_packets + e.rx_packets + e.time_exceeded > 0 {
        println!(
            "\negress: {} connections opened; out {} packets ({} bytes), back {} packets ({} bytes); ICMP errors translated {} in, {} out; {} time-exceeded sent; {} slow port allocations",
            e.new_conns,
            e.tx_packets,
            e.tx_bytes,
            e.rx_packets,
            e.rx_bytes,
            e.icmp_in,
            e.icmp_out,
            e.time_exceeded,
            e.alloc_slow
        );
    }
}

/// The embedded DNS server's counters (nothing when DNS is off).
fn dns(dp: &NodeStats) {
    let Some(d) = &dp.dns else { return };
    println!(
        "\ndns: {} networks; {} queries (udp {}, tcp {}); answers: {} noerror, {} nodata, {} nxdomain, {} servfail, {} formerr, {} notimp, {} refused, {} badvers, {} other; {} truncated; forwarded {} ({} timeouts, {} errors, {} over the cap); tcp {} connections ({} refused); {} ignored",
        d.networks,
        d.queries_udp + d.queries_tcp,
        d.queries_udp,
        d.queries_tcp,
        d.noerror,
        d.nodata,
        d.nxdomain,
        d.servfail,
        d.formerr,
        d.notimp,
        d.refused,
        d.badvers,
        d.other,
        d.truncated,
        d.forwarded,
        d.forward_timeouts,
        d.forward_errors,
        d.forward_over_cap,
        d.tcp_conns,
        d.tcp_refused,
        d.ignored
    );
}

/// Drops by reason, summed over the workers.
fn drops(dp: &NodeStats) {
    let mut drops = BTreeMap::<String, u64>::new();
    for (k, n) in dp.workers.iter().flat_map(|w| &w.drops) {
        *drops.entry(k.clone()).or_default() += n;
    }
    println!();
    if drops.is_empty() {
        println!("drops: none");
    } else {
        table(&["DROP REASON", "FRAMES"], drops.into_iter().map(|(k, n)| vec![k, n.to_string()]).collect());
    }
}

/// The CNI counters (nothing on a node no container runtime has used).
fn cni_line(k: &CniStats) -> Option<String> {
    (*k != CniStats::default()).then(|| {
        format!(
            "cni: {} adds ({} failed, {} of them waited out for a slot), {} dels, {} gcs; {} tasks reaped \
             (namespace gone), {} dels spooled",
            k.adds, k.add_failures, k.adds_waited_out, k.dels, k.gcs, k.reaped, k.spooled
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cni_line_shows_every_counter_once_a_runtime_used_the_node() {
        assert_eq!(cni_line(&CniStats::default()), None);
        let k = CniStats { adds: 9, add_failures: 2, dels: 6, gcs: 1, reaped: 3, spooled: 4, adds_waited_out: 1 };
        assert_eq!(
            cni_line(&k).as_deref(),
            Some(
                "cni: 9 adds (2 failed, 1 of them waited out for a slot), 6 dels, 1 gcs; 3 tasks reaped \
                 (namespace gone), 4 dels spooled"
            )
        );
        let reaped_only = CniStats { reaped: 1, ..CniStats::default() };
        assert!(cni_line(&reaped_only).is_some_and(|l| l.contains("1 tasks reaped")));
    }
}
