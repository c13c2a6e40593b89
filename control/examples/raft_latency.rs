//! Raft commit latency for a service update with 3 managers: each write
//! (a task's weight changing) goes through the leader and returns once a
//! majority has it on disk (fsynced) and the leader applied it.
//!
//!   cargo run --release -p meshplane-control --example raft_latency -- [WRITES] [tls|inproc]
//!   (defaults: 2000 tls)
//!
//! `tls`: the managers talk over loopback TCP with mutual TLS (the
//! management plane as it runs, a connection per RPC); `inproc`: the
//! in-process router. Each manager has its own directory under the
//! system's temporary directory (fsync on each append).

use meshplane_control::pki::{ClusterCa, JoinRole};
use meshplane_control::raft::{Router, node_addr, start, start_with};
use meshplane_control::state::{Availability, Command, Node, PublishRequest, Role};
use meshplane_control::tls::{TlsNetwork, join_new_key, serve};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let writes: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let tls = std::env::args().nth(2).is_none_or(|m| m != "inproc");
    let dir = std::env::temp_dir().join(format!("meshplane-raft-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let router = Router::default();
    let mut nodes = BTreeMap::new();
    let mut members: BTreeMap<u64, BasicNode> = BTreeMap::new();
    let mut servers = Vec::new();
    if tls {
        let ca = ClusterCa::init().expect("ca");
        let token = ca.token(JoinRole::Manager);
        let ca = std::sync::Arc::new(std::sync::Mutex::new(ca));
        let mut first_addr = None;
        for id in 1..=3u64 {
            let name = format!("m{id}");
            let ident = match first_addr {
                None => ca.lock().expect("ca").issue(&name, JoinRole::Manager).expect("issue"),
                Some(a) => join_new_key(a, "m1", &token, &name, None).await.expect("join").0,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
            let server = serve(listener, &ident, slot.clone(), (id == 1).then(|| ca.clone())).expect("serve");
            first_addr.get_or_insert(server.addr);
            members.insert(id, node_addr(&name, server.addr));
            let n = start_with(id, &dir.join(id.to_string()), TlsNetwork::new(&ident).expect("net"), 5000)
                .await
                .expect("start");
            *slot.lock().expect("slot") = Some(n.0.clone());
            nodes.insert(id, n);
            servers.push(server);
        }
    } else {
        for id in 1..=3u64 {
            nodes.insert(id, start(id, &dir.join(id.to_string()), &router, 5000).await.expect("start"));
            members.insert(id, BasicNode::new(format!("m{id}")));
        }
    }
    nodes[&1].0.initialize(members).await.expect("initialize");
    let leader = loop {
        if let Some(l) = nodes[&1].0.metrics().borrow().current_leader {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let raft = nodes[&leader].0.clone();
    let setup = [
        Command::AddNode(Node {
            id: "node1".into(),
            mgmt: "198.18.1.1:2377".parse().expect("addr"),
            data_ip: "198.18.0.1".parse().expect("ip"),
            data_mac: "02:00:00:00:00:01".parse().expect("mac"),
            role: Role::Manager,
            availability: Availability::Active,
            key_id: None,
            underlay_mtu: 1500,
        }),
        Command::CreateNetwork {
            name: "app".into(),
            subnet: "198.19.0.0/24".parse().expect("subnet"),
            gateway: None,
            mtu: None,
            internal: false,
        },
        Command::CreateService {
            name: "web".into(),
            network: "app".into(),
            protocol: Proto::Tcp,
            vip_port: Some(80),
            target_port: 8080,
            publish: vec![PublishRequest { port: None, mode: MeshMode::Nat }],
            scheduler: Scheduler::Mh,
            endpoint_mode: meshplane_control::state::EndpointMode::Vip,
            health: None,
        },
        Command::AttachTask {
            id: "web.1".into(),
            service: "web".into(),
            node: "node1".into(),
            weight: 1,
            netns: None,
            container: None,
        },
    ];
    for c in setup {
        raft.client_write(c).await.expect("setup write");
    }
    let mut lat = Vec::with_capacity(writes);
    let wall = Instant::now();
    for i in 0..writes {
        let t = Instant::now();
        let r = raft
            .client_write(Command::SetWeight { id: "web.1".into(), weight: 1 + (i % 100) as u32 })
            .await
            .expect("write");
        assert!(r.data.0.is_ok());
        lat.push(t.elapsed());
    }
    let total = wall.elapsed();
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "raft commit latency, 3 managers ({}, fsync on each append), {writes} sequential service updates: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} writes/s",
        if tls { "loopback TCP, mutual TLS" } else { "in-process network" },
        p(0.5),
        p(0.99),
        p(1.0),
        writes as f64 / total.as_secs_f64()
    );
    for (_, (r, _)) in nodes {
        let _ = r.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
