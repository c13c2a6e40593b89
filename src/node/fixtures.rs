//! Commands that build a small cluster state for the node's unit tests
//! (health checks, the reaper): nodes `n1`, `n2`, … and network `app`
//! (198.19.0.0/24), and services on it.

use meshplane_control::state::{Availability, Command, EndpointMode, HealthCheck, Node, Role};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::services::Proto;
use std::net::Ipv4Addr;

/// Manager node `id` with management address 198.18.1.`n` and data
/// address 198.18.0.`n`.
pub(crate) fn node(id: &str, n: u8) -> Command {
    Command::AddNode(Node {
        id: id.into(),
        mgmt: format!("198.18.1.{n}:2377").parse().expect("addr"),
        data_ip: Ipv4Addr::new(198, 18, 0, n),
        data_mac: meshplane_dataplane::wire::MacAddr([2, 0, 0, 0, 0, n]),
        role: Role::Manager,
        availability: Availability::Active,
        key_id: None,
        underlay_mtu: 1500,
    })
}

/// Network `app`, 198.19.0.0/24.
pub(crate) fn network() -> Command {
    serde_json::from_str(r#"{"CreateNetwork":{"name":"app","subnet":"198.19.0.0/24","gateway":null,"mtu":null}}"#)
        .expect("a network")
}

/// TCP service `name` on `app`: VIP port 80, target 8080, round robin.
pub(crate) fn service(name: &str, health: Option<HealthCheck>) -> Command {
    Command::CreateService {
        name: name.into(),
        network: "app".into(),
        protocol: Proto::Tcp,
        vip_port: Some(80),
        target_port: 8080,
        publish: Vec::new(),
        scheduler: Scheduler::Rr,
        endpoint_mode: EndpointMode::Vip,
        health,
    }
}
