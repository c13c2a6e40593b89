//! Prometheus metrics: `GET /metrics` on the management IP (port 9323 by
//! default, `--metrics-addr`), plain HTTP served by hyper, each request
//! within a deadline and at most `MAX_CONNECTIONS` at once. Every counter
//! the dataplane keeps, per worker (ports, drops by reason, connection
//! table, handoffs, services and backends), and the control plane's (state
//! version, node liveness, gossip, health checks, CNI requests), read from the admin API in the schema
//! of `dataplane::report` (`crate::stats`) and encoded by the `prometheus-client` crate.
//!
//! A client that asks for OpenMetrics (`Accept:
//! application/openmetrics-text`, as Prometheus does) gets the crate's
//! OpenMetrics text: counter families named without `_total`, their
//! samples with it, `# EOF` at the end. Any other client (curl, `promtool
//! check metrics`, which reads only the Prometheus text format 0.0.4) gets
//! the same text with the counters' HELP and TYPE lines under the samples'
//! name (`_total`) and without `# EOF`: the 0.0.4 form. The sample names
//! and labels are the same in both.

use crate::stats::{AdminStats, NodeStats, from_value};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use meshplane_control::cluster::{AdminRequest, Control};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// The default metrics port (Docker's daemon metrics port).
pub(crate) const DEFAULT_PORT: u16 = 9323;
/// The most connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// The most time one connection may take, request and answer.
const DEADLINE: Duration = Duration::from_secs(5);

/// The exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text 0.0.4.
    Prometheus,
}

/// One metric family's samples, each a label set and a value.
#[derive(Debug)]
struct Samples<L> {
    kind: MetricType,
    samples: Vec<(L, u64)>,
}

impl<L: EncodeLabelSet + std::fmt::Debug> EncodeMetric for Samples<L> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, v) in &self.samples {
            let mut e = encoder.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => e.encode_counter::<NoLabelSet, u64, u64>(v, None)?,
                _ => e.encode_gauge(v)?,
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// The metrics of one scrape, being registered.
struct Exposition {
    registry: Registry,
    /// The counters' family names (prefixed, without `_total`).
    counters: Vec<String>,
}

impl Exposition {
    /// Registers family `name` (a counter's ends in `_total`, which the
    /// encoder adds to its samples).
    fn family<L>(&mut self, name: &str, kind: MetricType, help: &str, samples: Vec<(L, u64)>)
    where
        L: EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    {
        let name = match kind {
            MetricType::Counter => {
                let family = name.strip_suffix("_total").unwrap_or(name);
                self.counters.push(format!("{PREFIX}_{family}"));
                family
            }
            _ => name,
        };
        // The encoder ends the help text with a full stop itself.
        self.registry.register(name, help.strip_suffix('.').unwrap_or(help), Samples { kind, samples });
    }

    /// Registers a family per worker, one sample each.
    fn per_worker(&mut self, dp: &NodeStats, name: &str, kind: MetricType, help: &str, v: fn(&WorkerStats) -> u64) {
        let samples = dp.workers.iter().enumerate().map(|(w, wk)| (Worker { worker: w.to_string() }, v(wk))).collect();
        self.family(name, kind, help, samples);
    }
}

use crate::stats::{BackendStats, PortStats, ServiceStats, WorkerStats};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Worker {
    worker: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Port {
    worker: String,
    port: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Drop {
    worker: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Service {
    worker: String,
    service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Backend {
    worker: String,
    service: String,
    backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Node {
    node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// A node as the admin API's `nodes` lists it (what the metrics use).
#[derive(serde::Deserialize)]
struct NodeStatus {
    name: String,
    status: String,
}

/// This node as the admin API's `info` tells (what the metrics use).
#[derive(serde::Deserialize)]
struct Info {
    version: u64,
    tables_version: Option<u64>,
}

/// A family read from `T`: its name, how to read a sample, its type and
/// its help.
type Read<T> = (&'static str, fn(&T) -> u64, MetricType, &'static str);

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

/// Per worker and I/O port.
fn ports(x: &mut Exposition, dp: &NodeStats) {
    let port_counters: [Read<PortStats>; 9] = [
        ("port_rx_frames_total", |p| p.rx, COUNTER, "Frames received on a port."),
        ("port_tx_frames_total", |p| p.tx, COUNTER, "Frames sent on a port."),
        ("port_tx_full_total", |p| p.tx_full, COUNTER, "Frames not sent: the port's transmit ring was full."),
        ("port_rx_oversize_total", |p| p.rx_oversize, COUNTER, "Frames received too large for a buffer."),
        (
            "port_rx_bad_offload_total",
            |p| p.rx_bad_offload,
            COUNTER,
            "Frames received with a virtio-net header that does not fit them (dropped).",
        ),
        (
            "port_tx_segmented_total",
            |p| p.tx_segmented,
            COUNTER,
            "Super-frames cut into segments in software for this port.",
        ),
        (
            "port_tx_coalesced_total",
            |p| p.tx_coalesced,
            COUNTER,
            "Segments coalesced into super-frames for this port (GRO).",
        ),
        (
            "port_rx_kernel_dropped_total",
            |p| p.rx_kernel_dropped,
            COUNTER,
            "Frames the kernel dropped before the port read them (AF_XDP rx ring full, no fill buffer).",
        ),
        ("port_errors_total", |p| p.errors, COUNTER, "I/O errors on a port."),
    ];
    for (name, v, kind, help) in port_counters {
        let samples = dp
            .workers
            .iter()
            .enumerate()
            .flat_map(|(w, wk)| {
                wk.ports.iter().map(move |p| (Port { worker: w.to_string(), port: p.name.clone() }, v(p)))
            })
            .collect();
        x.family(name, kind, help, samples);
    }
    let drops = dp
        .workers
        .iter()
        .enumerate()
        .flat_map(|(w, wk)| wk.drops.iter().map(move |(r, n)| (Drop { worker: w.to_string(), reason: r.clone() }, *n)))
        .collect();
    x.family("drops_total", COUNTER, "Frames dropped, by reason.", drops);
}

/// Per worker.
fn workers(x: &mut Exposition, dp: &NodeStats) {
    let worker_counters: [Read<WorkerStats>; 26] = [
        ("passed_total", |w| w.passed, COUNTER, "Frames passed to the kernel."),
        ("unbound_total", |w| w.unbound, COUNTER, "Frames for a port this worker has no I/O for."),
        ("conntrack_entries", |w| w.conntrack_entries, GAUGE, "Connection-table entries in use."),
        (
            "conntrack_unconfirmed_total",
            |w| w.conntrack_unconfirmed,
            COUNTER,
            "Connection-table entries made unconfirmed (TCP without SYN of an unknown connection).",
        ),
        (
            "conntrack_confirmed_total",
            |w| w.conntrack_confirmed,
            COUNTER,
            "Unconfirmed connection-table entries confirmed by a reply.",
        ),
        (
            "conntrack_flood_guard_drops_total",
            |w| w.conntrack_guarded,
            COUNTER,
            "New connections dropped by the flood guard (--max-new-conns-per-sec).",
        ),
        ("conntrack_evicted_total", |w| w.conntrack_evicted, COUNTER, "Live connection-table entries evicted."),
        (
            "mesh_frag_needed_total",
            |w| w.mesh_frag_needed,
            COUNTER,
            "ICMP fragmentation-needed sent to routing-mesh clients.",
        ),
        ("mesh_mss_clamped_total", |w| w.mesh_mss_clamped, COUNTER, "Routing-mesh SYNs whose MSS was clamped."),
        ("egress_connections_total", |w| w.egress.new_conns, COUNTER, "Egress connections opened by tasks."),
        ("egress_tx_packets_total", |w| w.egress.tx_packets, COUNTER, "Egress packets sent out, source-NATed."),
        ("egress_tx_bytes_total", |w| w.egress.tx_bytes, COUNTER, "Egress bytes sent out."),
        ("egress_rx_packets_total", |w| w.egress.rx_packets, COUNTER, "Egress replies delivered to tasks."),
        ("egress_rx_bytes_total", |w| w.egress.rx_bytes, COUNTER, "Egress reply bytes delivered to tasks."),
        ("egress_icmp_in_total", |w| w.egress.icmp_in, COUNTER, "ICMP errors translated back to tasks."),
        ("egress_icmp_out_total", |w| w.egress.icmp_out, COUNTER, "ICMP errors from tasks translated out."),
        ("egress_time_exceeded_total", |w| w.egress.time_exceeded, COUNTER, "Time-exceeded sent to tasks."),
        (
            "egress_alloc_slow_total",
            |w| w.egress.alloc_slow,
            COUNTER,
            "Egress port allocations that needed a second round (a range filling up).",
        ),
        ("new_connections_total", |w| w.new_connections, COUNTER, "Connections balanced."),
        ("handed_off_total", |w| w.handed_off, COUNTER, "Frames handed to worker 0 (connection state)."),
        ("handed_in_total", |w| w.handed_in, COUNTER, "Frames worker 0 took from the others."),
        ("handoff_full_total", |w| w.handoff_full, COUNTER, "Frames dropped: worker 0's inbox was full."),
        ("busy_rounds_total", |w| w.busy_rounds, COUNTER, "Worker rounds that received frames."),
        ("idle_waits_total", |w| w.idle_waits, COUNTER, "Times a worker slept waiting for frames."),
        (
            "spin_yields_total",
            |w| w.spin_yields,
            COUNTER,
            "Times a worker yielded its core while it spun for the next frame.",
        ),
        ("worker_tables_version", |w| w.tables_version, GAUGE, "The tables version a worker uses."),
    ];
    for (name, v, kind, help) in worker_counters {
        x.per_worker(dp, name, kind, help, v);
    }
}

/// Per worker and service, and per backend.
fn services(x: &mut Exposition, dp: &NodeStats) {
    let all = || dp.workers.iter().enumerate().flat_map(|(w, wk)| wk.services.iter().map(move |s| (w.to_string(), s)));
    let service_counters: [Read<ServiceStats>; 3] = [
        ("service_packets_total", |s| s.packets, COUNTER, "Packets balanced for a service."),
        ("service_bytes_total", |s| s.bytes, COUNTER, "Bytes balanced for a service."),
        ("service_new_connections_total", |s| s.new_connections, COUNTER, "Connections scheduled for a service."),
    ];
    for (name, v, kind, help) in service_counters {
        let samples = all().map(|(w, s)| (Service { worker: w, service: s.name.clone() }, v(s))).collect();
        x.family(name, kind, help, samples);
    }
    let backend_counters: [Read<BackendStats>; 5] = [
        ("backend_packets_total", |b| b.packets, COUNTER, "Packets balanced to a backend."),
        ("backend_bytes_total", |b| b.bytes, COUNTER, "Bytes balanced to a backend."),
        ("backend_new_connections_total", |b| b.new_connections, COUNTER, "Connections scheduled to a backend."),
        ("backend_active_connections", |b| u64::from(b.active), GAUGE, "Connections to a backend tracked now."),
        ("backend_weight", |b| u64::from(b.weight), GAUGE, "A backend's weight (0: draining)."),
    ];
    for (name, v, kind, help) in backend_counters {
        let samples = all()
            .flat_map(|(w, s)| {
                s.backends.iter().map(move |b| {
                    let labels =
                        Backend { worker: w.clone(), service: s.name.clone(), backend: format!("{}:{}", b.ip, b.port) };
                    (labels, v(b))
                })
            })
            .collect();
        x.family(name, kind, help, samples);
    }
}

/// The embedded DNS server's (none when DNS is off).
fn dns(x: &mut Exposition, dp: &NodeStats) {
    let Some(d) = &dp.dns else { return };
    let one = |v: u64| vec![(Vec::<(String, String)>::new(), v)];
    let by = |label: &str, v: &[(&str, u64)]| -> Vec<(Vec<(String, String)>, u64)> {
        v.iter().map(|(k, n)| (vec![(label.to_owned(), (*k).to_owned())], *n)).collect()
    };
    let queries = by("transport", &[("udp", d.queries_udp), ("tcp", d.queries_tcp)]);
    x.family("dns_queries_total", COUNTER, "DNS queries received from tasks.", queries);
    let answers = by(
        "rcode",
        &[
            ("noerror", d.noerror),
            ("nodata", d.nodata),
            ("nxdomain", d.nxdomain),
            ("servfail", d.servfail),
            ("formerr", d.formerr),
            ("notimp", d.notimp),
            ("refused", d.refused),
            ("badvers", d.badvers),
            ("other", d.other),
        ],
    );
    x.family("dns_answers_total", COUNTER, "DNS answers sent to tasks, by result.", answers);
    let counters: [(&str, u64, &str); 8] = [
        ("dns_truncated_total", d.truncated, "UDP answers cut to fit, with TC set."),
        ("dns_forwarded_total", d.forwarded, "DNS queries forwarded upstream."),
        ("dns_forward_timeouts_total", d.forward_timeouts, "Upstream tries that timed out."),
        ("dns_forward_errors_total", d.forward_errors, "Upstream tries that failed (errors, SERVFAIL, REFUSED, none)."),
        ("dns_forward_over_cap_total", d.forward_over_cap, "DNS queries not forwarded: too many in flight."),
        ("dns_tcp_connections_total", d.tcp_conns, "DNS TCP connections accepted."),
        ("dns_tcp_refused_total", d.tcp_refused, "DNS TCP connections refused: too many open."),
        ("dns_ignored_total", d.ignored, "DNS datagrams ignored (too short, or responses)."),
    ];
    for (name, v, help) in counters {
        x.family(name, COUNTER, help, one(v));
    }
    x.family("dns_networks", GAUGE, "Networks the embedded DNS serves now.", one(d.networks));
}

/// The control plane's: liveness, versions, gossip.
fn control(x: &mut Exposition, stats: &AdminStats, nodes: &[NodeStatus], info: &Info) {
    let up = nodes.iter().map(|n| (Node { node: n.name.clone() }, u64::from(n.status == "ready"))).collect();
    x.family("node_up", GAUGE, "1 if gossip sees the node alive (this node's view).", up);
    let one = |v: u64| vec![(Vec::<(String, String)>::new(), v)];
    x.family("cluster_state_version", GAUGE, "The cluster state version this node has.", one(info.version));
    let tables = one(info.tables_version.unwrap_or(0));
    x.family("tables_version", GAUGE, "The version of this node's last published tables.", tables);
    let g = stats.gossip.clone().unwrap_or_default();
    x.family("gossip_sent_total", COUNTER, "Gossip packets sent.", one(g.sent));
    x.family("gossip_received_total", COUNTER, "Gossip packets received and accepted.", one(g.received));
    let rejected = [
        ("short", g.rejected_short),
        ("unknown_key", g.rejected_unknown_key),
        ("bad_tag", g.rejected_bad_tag),
        ("undecodable", g.rejected_undecodable),
        ("retired_key", g.rejected_retired_key),
        ("wrong_sender", g.rejected_wrong_sender),
        ("replayed", g.rejected_replayed),
    ]
    .map(|(r, n)| (Reason { reason: r.to_owned() }, n));
    x.family("gossip_rejected_total", COUNTER, "Gossip packets dropped, by reason.", rejected.to_vec());
    let m = stats.management.clone().unwrap_or_default();
    x.family("management_connections_open", GAUGE, "Management plane connections open.", one(m.open));
    x.family(
        "management_connections_accepted_total",
        COUNTER,
        "Management plane connections admitted.",
        one(m.accepted),
    );
    x.family("management_requests_total", COUNTER, "Management plane requests answered.", one(m.requests));
    let closed = [
        ("refused_total", m.refused_total),
        ("refused_per_ip", m.refused_per_ip),
        ("accept_error", m.accept_errors),
        ("handshake_timeout", m.handshake_timeouts),
        ("handshake_failed", m.handshake_failed),
        ("request_timeout", m.request_timeouts),
        ("idle", m.idle_closed),
        ("write_timeout", m.write_timeouts),
        ("too_large", m.too_large),
        ("bad_frame", m.bad_frames),
        ("expired_certificate", m.expired_closed),
    ]
    .map(|(r, n)| (Reason { reason: r.to_owned() }, n));
    x.family(
        "management_connections_closed_total",
        COUNTER,
        "Management plane connections refused or closed by its limits, by reason.",
        closed.to_vec(),
    );
    let h = stats.health.clone().unwrap_or_default();
    x.family("health_checked_tasks", GAUGE, "Tasks of this node whose health checks it runs.", one(h.tasks));
    x.family("health_checks_total", COUNTER, "Health probes run.", one(h.checks));
    x.family("health_check_failures_total", COUNTER, "Health probes that failed.", one(h.failures));
    let to = |state: &str, n: u64| (vec![("to".to_owned(), state.to_owned())], n);
    x.family(
        "health_transitions_total",
        COUNTER,
        "Tasks that became healthy or unhealthy, by health.",
        vec![to("healthy", h.to_healthy), to("unhealthy", h.to_unhealthy)],
    );
    x.family("health_proposals_total", COUNTER, "Health transitions the cluster took.", one(h.proposed));
    x.family(
        "health_proposal_errors_total",
        COUNTER,
        "Health transitions the cluster could not take (proposed again).",
        one(h.propose_errors),
    );
}

/// The CNI requests this node served, and what its reaper and spool did
/// (all zero on a node no runtime uses).
fn cni(x: &mut Exposition, stats: &AdminStats) {
    let k = &stats.cni;
    let one = |v: u64| vec![(Vec::<(String, String)>::new(), v)];
    let counters: [(&str, u64, &str); 7] = [
        ("cni_adds_total", k.adds, "CNI ADDs asked of this node."),
        ("cni_add_failures_total", k.add_failures, "CNI ADDs that failed (the runtime got an error)."),
        ("cni_dels_total", k.dels, "CNI DELs asked of this node."),
        ("cni_gcs_total", k.gcs, "CNI GCs asked of this node."),
        ("cni_reaped_total", k.reaped, "Container tasks detached because their network namespace went."),
        ("cni_spooled_total", k.spooled, "CNI DELs spooled because they could not commit (retried by the reaper)."),
        (
            "cni_adds_waited_out_total",
            k.adds_waited_out,
            "CNI ADDs refused (try again) because the node's ADD slots stayed full until their deadline.",
        ),
    ];
    for (name, v, help) in counters {
        x.family(name, COUNTER, help, one(v));
    }
}

/// The metric names' prefix.
const PREFIX: &str = "meshplane";

/// The OpenMetrics text in the Prometheus text format 0.0.4: a counter's
/// HELP and TYPE lines under its samples' name, no `# EOF`.
fn prometheus_text(openmetrics: &str, counters: &[String]) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let family = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")).map(|r| r.split(' ').next());
        match family {
            Some(Some(name)) if counters.iter().any(|c| c == name) => {
                out.push_str(&line.replacen(name, &format!("{name}_total"), 1));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The exposition text, in `format`.
fn render(stats: &AdminStats, nodes: &[NodeStatus], info: &Info, format: Format) -> String {
    let mut x = Exposition { registry: Registry::with_prefix(PREFIX), counters: Vec::new() };
    ports(&mut x, &stats.dataplane);
    workers(&mut x, &stats.dataplane);
    services(&mut x, &stats.dataplane);
    dns(&mut x, &stats.dataplane);
    control(&mut x, stats, nodes, info);
    cni(&mut x, stats);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &x.registry) {
        tracing::warn!("encoding the metrics: {e}");
    }
    match format {
        Format::OpenMetrics => text,
        Format::Prometheus => prometheus_text(&text, &x.counters),
    }
}

/// The exposition from the node's admin API.
async fn scrape(control: &Arc<Control>, format: Format) -> anyhow::Result<String> {
    let answer = |r: meshplane_control::cluster::AdminResponse| r.map_err(anyhow::Error::msg);
    let stats: AdminStats = from_value("stats", answer(control.admin(AdminRequest::Stats).await)?)?;
    let nodes: Vec<NodeStatus> = from_value("nodes", answer(control.admin(AdminRequest::Nodes).await)?)?;
    let info: Info = from_value("info", answer(control.admin(AdminRequest::Info).await)?)?;
    Ok(render(&stats, &nodes, &info, format))
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

/// One request: `GET /metrics`, or why not.
async fn handle(
    control: Arc<Control>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != hyper::Method::GET {
        return Ok(respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET /metrics\n".to_owned()));
    }
    if req.uri().path() != "/metrics" {
        return Ok(respond(StatusCode::NOT_FOUND, TEXT, "only /metrics here\n".to_owned()));
    }
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let (format, content_type) = if accept.contains("application/openmetrics-text") {
        (Format::OpenMetrics, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (Format::Prometheus, "text/plain; version=0.0.4; charset=utf-8")
    };
    Ok(match scrape(&control, format).await {
        Ok(text) => respond(StatusCode::OK, content_type, text),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e:#}\n")),
    })
}

/// Serves `/metrics` on `listener` until the runtime stops.
pub(crate) async fn serve(listener: tokio::net::TcpListener, control: Arc<Control>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut last_warn = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                meshplane_control::rpc::accept_failed("metrics", &e, &mut last_warn).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(control.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), service);
            if tokio::time::timeout(DEADLINE, conn).await.is_err() {
                tracing::debug!("metrics: a connection took longer than {DEADLINE:?}; closed");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_of_a_stats_answer() {
        let stats = serde_json::json!({
            "dataplane": { "tables_version": 3, "workers": [{
                "tables_version": 3,
                "ports": [{ "name": "uplink", "rx": 10, "tx": 7, "tx_full": 0, "rx_oversize": 0, "errors": 0, "rx_bad_offload": 0, "tx_segmented": 0, "tx_coalesced": 0, "rx_kernel_dropped": 0 }],
                "drops": { "unknown_vni": 2 },
                "passed": 1, "unbound": 0, "conntrack_entries": 4, "new_connections": 2,
                "conntrack_unconfirmed": 6, "conntrack_confirmed": 1, "conntrack_guarded": 3, "conntrack_evicted": 0, "mesh_frag_needed": 2, "mesh_mss_clamped": 1,
                "egress": { "new_conns": 7, "tx_packets": 70, "tx_bytes": 7000, "rx_packets": 60, "rx_bytes": 6000,
                    "icmp_in": 1, "icmp_out": 0, "time_exceeded": 2, "alloc_slow": 0, "neigh_miss": null },
                "handed_off": 0, "handed_in": 0, "handoff_full": 0, "busy_rounds": 5, "idle_waits": 9,
                "services": [{ "name": "web", "packets": 6, "bytes": 600, "new_connections": 2,
                    "backends": [{ "ip": "198.19.0.5", "port": 8080, "weight": 1, "packets": 6, "bytes": 600,
                        "new_connections": 2, "active": 1 }] }],
                "traffic": []
            }],
            "dns": { "queries_udp": 11, "queries_tcp": 2, "noerror": 8, "nodata": 1, "nxdomain": 1, "servfail": 2,
                "formerr": 1, "notimp": 0, "refused": 0, "badvers": 0, "other": 0, "truncated": 0, "forwarded": 3,
                "forward_timeouts": 1, "forward_errors": 0, "forward_over_cap": 0, "tcp_conns": 1, "tcp_refused": 0,
                "ignored": 0, "networks": 2 }},
            "gossip": { "sent": 40, "received": 38, "rejected_short": 0, "rejected_unknown_key": 1,
                "rejected_bad_tag": 0, "rejected_undecodable": 0, "members": [] },
            "management": { "open": 3, "accepted": 9, "refused_total": 0, "refused_per_ip": 2, "accept_errors": 0,
                "handshake_timeouts": 1, "handshake_failed": 0, "request_timeouts": 4, "idle_closed": 0,
                "write_timeouts": 0, "too_large": 0, "bad_frames": 0, "expired_closed": 0, "requests": 20 },
            "health": { "tasks": 2, "checks": 50, "failures": 4, "to_healthy": 3, "to_unhealthy": 1,
                "proposed": 4, "propose_errors": 1 },
            "cni": { "adds": 9, "add_failures": 2, "dels": 6, "gcs": 1, "reaped": 3, "spooled": 4,
                "adds_waited_out": 5 }
        });
        let stats: AdminStats = serde_json::from_value(stats).expect("the stats schema");
        let nodes = serde_json::json!([{ "name": "node1", "status": "ready" }, { "name": "node3", "status": "down" }]);
        let nodes: Vec<NodeStatus> = serde_json::from_value(nodes).expect("nodes");
        let info = Info { version: 17, tables_version: Some(12) };
        let t = render(&stats, &nodes, &info, Format::Prometheus);
        for line in [
            "# TYPE meshplane_port_rx_frames_total counter",
            "meshplane_port_rx_frames_total{worker=\"0\",port=\"uplink\"} 10",
            "meshplane_drops_total{worker=\"0\",reason=\"unknown_vni\"} 2",
            "meshplane_conntrack_entries{worker=\"0\"} 4",
            "meshplane_conntrack_unconfirmed_total{worker=\"0\"} 6",
            "meshplane_conntrack_flood_guard_drops_total{worker=\"0\"} 3",
            "meshplane_mesh_frag_needed_total{worker=\"0\"} 2",
            "meshplane_mesh_mss_clamped_total{worker=\"0\"} 1",
            "meshplane_egress_connections_total{worker=\"0\"} 7",
            "meshplane_egress_rx_bytes_total{worker=\"0\"} 6000",
            "meshplane_service_bytes_total{worker=\"0\",service=\"web\"} 600",
            "meshplane_backend_active_connections{worker=\"0\",service=\"web\",backend=\"198.19.0.5:8080\"} 1",
            "meshplane_node_up{node=\"node3\"} 0",
            "meshplane_dns_queries_total{transport=\"udp\"} 11",
            "meshplane_dns_answers_total{rcode=\"servfail\"} 2",
            "meshplane_dns_forward_timeouts_total 1",
            "meshplane_dns_networks 2",
            "meshplane_cluster_state_version 17",
            "meshplane_gossip_rejected_total{reason=\"unknown_key\"} 1",
            "meshplane_gossip_rejected_total{reason=\"replayed\"} 0",
            "meshplane_management_connections_open 3",
            "meshplane_management_connections_closed_total{reason=\"request_timeout\"} 4",
            "meshplane_management_connections_closed_total{reason=\"refused_per_ip\"} 2",
            "meshplane_health_checked_tasks 2",
            "meshplane_health_checks_total 50",
            "meshplane_health_check_failures_total 4",
            "meshplane_health_transitions_total{to=\"unhealthy\"} 1",
            "meshplane_health_proposal_errors_total 1",
            "# TYPE meshplane_cni_adds_total counter",
            "meshplane_cni_adds_total 9",
            "meshplane_cni_add_failures_total 2",
            "meshplane_cni_dels_total 6",
            "meshplane_cni_gcs_total 1",
            "meshplane_cni_reaped_total 3",
            "meshplane_cni_spooled_total 4",
            "meshplane_cni_adds_waited_out_total 5",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').expect("a value");
            assert!(v.parse::<u64>().is_ok(), "{l}");
        }
        // OpenMetrics: the same samples; counter families without `_total`.
        let om = render(&stats, &nodes, &info, Format::OpenMetrics);
        assert!(om.contains("# TYPE meshplane_port_rx_frames counter\n"), "{om}");
        assert!(om.contains("meshplane_port_rx_frames_total{worker=\"0\",port=\"uplink\"} 10\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE meshplane_cni_reaped counter\nmeshplane_cni_reaped_total 3\n"), "{om}");
    }

    #[test]
    fn a_stats_answer_without_cni_counters_exposes_zeros() {
        // A node older than CNI support answers without `cni`.
        let stats = serde_json::json!({ "dataplane": { "tables_version": 1, "workers": [] } });
        let stats: AdminStats = serde_json::from_value(stats).expect("the stats schema");
        let info = Info { version: 1, tables_version: None };
        let t = render(&stats, &[], &info, Format::Prometheus);
        for name in ["adds", "add_failures", "dels", "gcs", "reaped", "spooled", "adds_waited_out"] {
            let line = format!("meshplane_cni_{name}_total 0");
            assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
        }
    }
}
