//! Prometheus metrics: `GET /metrics` on the management IP (port 9323 by
//! default, `--metrics-addr`), plain HTTP, the text exposition format.
//! Every counter the dataplane keeps, per worker (ports, drops by reason,
//! connection table, handoffs, services and backends), and the control
//! plane's (state version, node liveness, gossip).

use meshplane_control::cluster::{AdminRequest, Control};
use serde_json::Value;
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The default metrics port (Docker's daemon metrics port).
pub(crate) const DEFAULT_PORT: u16 = 9323;

/// One metric family being written: HELP and TYPE once, then samples.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP meshplane_{name} {help}\n# TYPE meshplane_{name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        let l: Vec<String> = labels.iter().map(|(k, x)| format!("{k}=\"{}\"", escape(x))).collect();
        if l.is_empty() {
            let _ = writeln!(self.text, "meshplane_{name} {v}");
        } else {
            let _ = writeln!(self.text, "meshplane_{name}{{{}}} {v}", l.join(","));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        x => x.to_string(),
    }
}

/// The exposition text from the admin API's `stats` and `nodes` answers.
pub(crate) fn render(stats: &Value, nodes: &Value, info: &Value) -> String {
    let mut o = Out { text: String::new() };
    let workers: Vec<(String, &Value)> = stats["dataplane"]["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, w)| (i.to_string(), w))
        .collect();
    let port_counters = [
        ("port_rx_frames_total", "rx", "Frames received on a port."),
        ("port_tx_frames_total", "tx", "Frames sent on a port."),
        ("port_tx_full_total", "tx_full", "Frames not sent: the port's transmit ring was full."),
        ("port_rx_oversize_total", "rx_oversize", "Frames received too large for a buffer."),
        ("port_errors_total", "errors", "I/O errors on a port."),
    ];
    for (name, key, help) in port_counters {
        o.family(name, "counter", help);
        for (w, wk) in &workers {
            for p in wk["ports"].as_array().into_iter().flatten() {
                o.sample(name, &[("worker", w), ("port", &s(&p["name"]))], u(&p[key]));
            }
        }
    }
    o.family("drops_total", "counter", "Frames dropped, by reason.");
    for (w, wk) in &workers {
        for (reason, n) in wk["drops"].as_object().into_iter().flatten() {
            o.sample("drops_total", &[("worker", w), ("reason", reason)], u(n));
        }
    }
    let worker_counters = [
        ("passed_total", "passed", "counter", "Frames passed to the kernel."),
        ("unbound_total", "unbound", "counter", "Frames for a port this worker has no I/O for."),
        ("conntrack_entries", "conntrack_entries", "gauge", "Connection-table entries in use."),
        ("new_connections_total", "new_connections", "counter", "Connections balanced."),
        ("handed_off_total", "handed_off", "counter", "Frames handed to worker 0 (connection state)."),
        ("handed_in_total", "handed_in", "counter", "Frames worker 0 took from the others."),
        ("handoff_full_total", "handoff_full", "counter", "Frames dropped: worker 0's inbox was full."),
        ("busy_rounds_total", "busy_rounds", "counter", "Worker rounds that received frames."),
        ("idle_waits_total", "idle_waits", "counter", "Times a worker slept waiting for frames."),
        ("worker_tables_version", "tables_version", "gauge", "The tables version a worker uses."),
    ];
    for (name, key, kind, help) in worker_counters {
        o.family(name, kind, help);
        for (w, wk) in &workers {
            o.sample(name, &[("worker", w)], u(&wk[key]));
        }
    }
    let service_counters = [
        ("service_packets_total", "packets", "Packets balanced for a service."),
        ("service_bytes_total", "bytes", "Bytes balanced for a service."),
        ("service_new_connections_total", "new_connections", "Connections scheduled for a service."),
    ];
    for (name, key, help) in service_counters {
        o.family(name, "counter", help);
        for (w, wk) in &workers {
            for sv in wk["services"].as_array().into_iter().flatten() {
                o.sample(name, &[("worker", w), ("service", &s(&sv["name"]))], u(&sv[key]));
            }
        }
    }
    let backend_counters = [
        ("backend_packets_total", "packets", "counter", "Packets balanced to a backend."),
        ("backend_bytes_total", "bytes", "counter", "Bytes balanced to a backend."),
        ("backend_new_connections_total", "new_connections", "counter", "Connections scheduled to a backend."),
        ("backend_active_connections", "active", "gauge", "Connections to a backend tracked now."),
        ("backend_weight", "weight", "gauge", "A backend's weight (0: draining)."),
    ];
    for (name, key, kind, help) in backend_counters {
        o.family(name, kind, help);
        for (w, wk) in &workers {
            for sv in wk["services"].as_array().into_iter().flatten() {
                for b in sv["backends"].as_array().into_iter().flatten() {
                    let be = format!("{}:{}", s(&b["ip"]), s(&b["port"]));
                    o.sample(name, &[("worker", w), ("service", &s(&sv["name"])), ("backend", &be)], u(&b[key]));
                }
            }
        }
    }
    o.family("node_up", "gauge", "1 if gossip sees the node alive (this node's view).");
    for n in nodes.as_array().into_iter().flatten() {
        o.sample("node_up", &[("node", &s(&n["name"]))], u64::from(n["status"] == "ready"));
    }
    o.family("cluster_state_version", "gauge", "The cluster state version this node has.");
    o.sample("cluster_state_version", &[], u(&info["version"]));
    o.family("tables_version", "gauge", "The version of this node's last published tables.");
    o.sample("tables_version", &[], u(&info["tables_version"]));
    let g = &stats["gossip"];
    o.family("gossip_sent_total", "counter", "Gossip packets sent.");
    o.sample("gossip_sent_total", &[], u(&g["sent"]));
    o.family("gossip_received_total", "counter", "Gossip packets received and accepted.");
    o.sample("gossip_received_total", &[], u(&g["received"]));
    o.family("gossip_rejected_total", "counter", "Gossip packets dropped, by reason.");
    for (reason, key) in [
        ("short", "rejected_short"),
        ("unknown_key", "rejected_unknown_key"),
        ("bad_tag", "rejected_bad_tag"),
        ("undecodable", "rejected_undecodable"),
    ] {
        o.sample("gossip_rejected_total", &[("reason", reason)], u(&g[key]));
    }
    o.text
}

/// Serves `/metrics` on `listener` until the runtime stops.
pub(crate) async fn serve(listener: tokio::net::TcpListener, control: Arc<Control>) {
    while let Ok((mut sock, _)) = listener.accept().await {
        let control = control.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // The request head (bounded; the body of a GET is ignored).
            while n < buf.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let line = head.lines().next().unwrap_or_default();
            let (status, body) = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["GET", "/metrics", ..] => {
                    let stats = control.admin(AdminRequest::Stats).await.unwrap_or_default();
                    let nodes = control.admin(AdminRequest::Nodes).await.unwrap_or_default();
                    let info = control.admin(AdminRequest::Info).await.unwrap_or_default();
                    ("200 OK", render(&stats, &nodes, &info))
                }
                ["GET", ..] => ("404 Not Found", "only /metrics here\n".to_owned()),
                _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_of_a_stats_answer() {
        let stats = serde_json::json!({
            "dataplane": { "workers": [{
                "tables_version": 3,
                "ports": [{ "name": "uplink", "rx": 10, "tx": 7, "tx_full": 0, "rx_oversize": 0, "errors": 0 }],
                "drops": { "unknown_vni": 2 },
                "passed": 1, "unbound": 0, "conntrack_entries": 4, "new_connections": 2,
                "handed_off": 0, "handed_in": 0, "handoff_full": 0, "busy_rounds": 5, "idle_waits": 9,
                "services": [{ "name": "web", "packets": 6, "bytes": 600, "new_connections": 2,
                    "backends": [{ "ip": "198.19.0.5", "port": 8080, "weight": 1, "packets": 6, "bytes": 600,
                        "new_connections": 2, "active": 1 }] }]
            }]},
            "gossip": { "sent": 40, "received": 38, "rejected_short": 0, "rejected_unknown_key": 1,
                "rejected_bad_tag": 0, "rejected_undecodable": 0, "members": [] }
        });
        let nodes = serde_json::json!([{ "name": "node1", "status": "ready" }, { "name": "node3", "status": "down" }]);
        let info = serde_json::json!({ "version": 17, "tables_version": 12 });
        let t = render(&stats, &nodes, &info);
        for line in [
            "# TYPE meshplane_port_rx_frames_total counter",
            "meshplane_port_rx_frames_total{worker=\"0\",port=\"uplink\"} 10",
            "meshplane_drops_total{worker=\"0\",reason=\"unknown_vni\"} 2",
            "meshplane_conntrack_entries{worker=\"0\"} 4",
            "meshplane_service_bytes_total{worker=\"0\",service=\"web\"} 600",
            "meshplane_backend_active_connections{worker=\"0\",service=\"web\",backend=\"198.19.0.5:8080\"} 1",
            "meshplane_node_up{node=\"node3\"} 0",
            "meshplane_cluster_state_version 17",
            "meshplane_gossip_rejected_total{reason=\"unknown_key\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').expect("a value");
            assert!(v.parse::<u64>().is_ok(), "{l}");
        }
    }
}
