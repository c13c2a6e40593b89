//! Time from a committed change to the new tables being used by a worker:
//! a service update committed through Raft (3 managers), the node's tables
//! compiled from the leader's state (`compile`, then the dataplane's
//! validation and Maglev build), published, and picked up by an idle
//! dataplane worker (woken by the publish).
//!
//!   cargo run --release -p meshplane-control --example publish_latency -- [CHANGES]   (default 500)

use meshplane_control::compile::compile;
use meshplane_control::raft::{Router, start};
use meshplane_control::state::{Availability, Command, Node, PublishRequest, Role};
use meshplane_dataplane::io::mem::MemPort;
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use meshplane_dataplane::worker::{Bound, Shared, Worker, WorkerConfig};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let dir = std::env::temp_dir().join(format!("meshplane-publish-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let router = Router::default();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, start(id, &dir.join(id.to_string()), &router, 5000).await.expect("start"));
    }
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|id| (id, BasicNode::new(format!("m{id}")))).collect();
    nodes[&1].0.initialize(members).await.expect("initialize");
    let leader = loop {
        if let Some(l) = nodes[&1].0.metrics().borrow().current_leader {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (raft, sm) = nodes[&leader].clone();
    let mut setup = vec![Command::CreateNetwork {
        name: "app".into(),
        subnet: "198.19.0.0/24".parse().expect("subnet"),
        gateway: None,
        mtu: None,
        internal: false,
    }];
    for n in 1..=3u8 {
        setup.insert(
            0,
            Command::AddNode(Node {
                id: format!("node{n}"),
                mgmt: format!("198.18.1.{n}:2377").parse().expect("addr"),
                data_ip: format!("198.18.0.{n}").parse().expect("ip"),
                data_mac: format!("02:00:00:00:00:0{n}").parse().expect("mac"),
                role: Role::Manager,
                availability: Availability::Active,
                key_id: None,
                underlay_mtu: 1500,
            }),
        );
    }
    setup.push(Command::CreateService {
        name: "web".into(),
        network: "app".into(),
        protocol: Proto::Tcp,
        vip_port: Some(80),
        target_port: 8080,
        publish: vec![PublishRequest { port: None, mode: MeshMode::Nat }],
        scheduler: Scheduler::Mh,
        endpoint_mode: meshplane_control::state::EndpointMode::Vip,
        health: None,
    });
    for n in 1..=3u8 {
        setup.push(Command::AttachTask {
            id: format!("web.{n}"),
            service: "web".into(),
            node: format!("node{n}"),
            weight: 1,
            netns: None,
            container: None,
        });
    }
    for c in setup {
        raft.client_write(c).await.expect("setup");
    }
    // Node 1's dataplane: one idle worker on an in-memory uplink and its task port.
    let spec = compile(&sm.state(), "node1", &|_| true, 1).expect("compile");
    let shared = Shared::new(Tables::compile(&spec).expect("tables"), 1);
    let ports = vec![
        Bound::new("uplink", Box::new(MemPort::new("uplink").0)),
        Bound::new("web.1", Box::new(MemPort::new("web.1").0)),
    ];
    let worker = Worker::new(0, ports, shared.clone(), WorkerConfig::default()).expect("worker");
    let h = std::thread::spawn(move || worker.run());
    let mut lat = Vec::with_capacity(changes);
    for i in 0..changes {
        tokio::time::sleep(Duration::from_millis(5)).await; // the worker goes back to sleep
        raft.client_write(Command::SetWeight { id: "web.2".into(), weight: 1 + (i % 50) as u32 }).await.expect("write");
        // Committed: from here to the worker using the new tables.
        let t = Instant::now();
        let spec = compile(&sm.state(), "node1", &|_| true, 2 + i as u64).expect("compile");
        shared.publish(Tables::compile(&spec).expect("tables"));
        let want = shared.version();
        while shared.in_use(0) < want {
            std::hint::spin_loop();
        }
        lat.push(t.elapsed());
    }
    shared.stop();
    let _ = h.join();
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "committed change -> tables in use by an idle worker ({changes} changes; compile with a 65537-slot Maglev ring, publish, wake): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    for (_, (r, _)) in nodes {
        let _ = r.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
