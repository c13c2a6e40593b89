//! The state model: allocation, validation, determinism, and compilation
//! into a node's tables that the dataplane accepts and forwards by.

use meshplane_control::compile::compile;
use meshplane_control::state::{Availability, ClusterState, Command, Node, PublishRequest, Role, StateError, mac_for};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process};
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use std::net::Ipv4Addr;

fn node(n: u8) -> Command {
    Command::AddNode(Node {
        id: format!("node{n}"),
        mgmt: format!("198.18.1.{n}:2377").parse().unwrap(),
        data_ip: Ipv4Addr::new(198, 18, 0, n),
        data_mac: format!("02:00:00:00:00:0{n}").parse().unwrap(),
        role: if n == 1 { Role::Manager } else { Role::Worker },
        availability: Availability::Active,
        key_id: None,
    })
}

fn network(name: &str, subnet: &str) -> Command {
    Command::CreateNetwork { name: name.into(), subnet: subnet.parse().unwrap(), gateway: None, mtu: None }
}

fn service(name: &str, vip: Option<u16>, publish: &[(Option<u16>, MeshMode)]) -> Command {
    Command::CreateService {
        name: name.into(),
        network: "app".into(),
        protocol: Proto::Tcp,
        vip_port: vip,
        target_port: 8080,
        publish: publish.iter().map(|&(port, mode)| PublishRequest { port, mode }).collect(),
        scheduler: Scheduler::Rr,
    }
}

fn task(id: &str, service: &str, node: &str) -> Command {
    Command::AttachTask { id: id.into(), service: service.into(), node: node.into(), weight: 1, netns: None }
}

/// Two nodes, network app (198.19.0.0/24), service web (VIP :80, published
/// 30000 nat), one task on each node.
fn cluster() -> ClusterState {
    let mut s = ClusterState::new();
    for c in [
        node(1),
        node(2),
        network("app", "198.19.0.0/24"),
        service("web", Some(80), &[(None, MeshMode::Nat)]),
        task("web.1", "web", "node1"),
        task("web.2", "web", "node2"),
    ] {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    s
}

#[test]
fn allocation_follows_swarm() {
    let mut s = cluster();
    let app = &s.networks["app"];
    assert_eq!((app.vni, app.gateway, app.mtu), (4096, Ipv4Addr::new(198, 19, 0, 254), 1450));
    let web = &s.services["web"];
    assert_eq!(web.vip, Some((Ipv4Addr::new(198, 19, 0, 1), 80)), "the VIP is the first free host address");
    assert_eq!(web.published[0].port, 30000, "auto-assigned from 30000");
    // Each node has an address in the network (the routing mesh).
    assert_eq!(app.node_ips.len(), 2);
    let t1 = &s.tasks["web.1"];
    assert_eq!(t1.mac, mac_for(t1.ip));
    assert_eq!(t1.mac.to_string(), format!("02:42:c6:13:00:{:02x}", t1.ip.octets()[3]));
    // Every address distinct.
    let mut all: Vec<Ipv4Addr> = s.tasks.values().map(|t| t.ip).collect();
    all.extend(app.node_ips.values());
    all.push(Ipv4Addr::new(198, 19, 0, 1));
    all.push(app.gateway);
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no address given twice: {all:?}");
    // A second network gets the next VNI; a second published service the
    // next port; a chosen port is kept.
    s.apply(&network("db", "198.19.1.0/24")).unwrap();
    assert_eq!(s.networks["db"].vni, 4097);
    s.apply(&service("api", None, &[(None, MeshMode::PreserveSource), (Some(31000), MeshMode::Nat)])).unwrap();
    let api = &s.services["api"];
    assert_eq!(api.published.iter().map(|p| p.port).collect::<Vec<_>>(), [30001, 31000]);
    // A freed address is reused.
    let ip2 = s.tasks["web.2"].ip;
    s.apply(&Command::DetachTask { id: "web.2".into() }).unwrap();
    s.apply(&task("web.3", "web", "node1")).unwrap();
    assert_eq!(s.tasks["web.3"].ip, ip2);
}

#[test]
fn mistakes_are_refused_with_clear_errors_and_change_nothing() {
    let s0 = cluster();
    let cases: Vec<(Command, &str)> = vec![
        (network("app", "198.19.9.0/24"), "network \"app\" already exists"),
        (network("other", "198.19.0.128/25"), "subnet 198.19.0.128/25 overlaps network \"app\" (198.19.0.0/24)"),
        (network("tiny", "198.19.5.0/30"), "subnet 198.19.5.0/30 is too small"),
        (
            Command::CreateNetwork {
                name: "gw".into(),
                subnet: "198.19.6.0/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(198, 19, 7, 1)),
                mtu: None,
            },
            "gateway 198.19.7.1 is not a host address of 198.19.6.0/24",
        ),
        (
            service("again", None, &[(Some(30000), MeshMode::Nat)]),
            "port 30000/tcp is already published by service \"web\"",
        ),
        (service("web", Some(80), &[]), "service \"web\" already exists"),
        (service("nothing", None, &[]), "needs a vip port or a published port"),
        (
            Command::CreateService {
                name: "x".into(),
                network: "nope".into(),
                protocol: Proto::Udp,
                vip_port: Some(53),
                target_port: 53,
                publish: vec![],
                scheduler: Scheduler::Mh,
            },
            "no network \"nope\"",
        ),
        (task("web.1", "web", "node2"), "task \"web.1\" already exists"),
        (task("t", "web", "node9"), "no node \"node9\""),
        (task("t", "nope", "node1"), "no service \"nope\""),
        (Command::RemoveNetwork { name: "app".into() }, "network \"app\" is used by service \"web\""),
        (task("bad name!", "web", "node1"), "task name \"bad name!\""),
    ];
    for (cmd, want) in cases {
        let mut s = s0.clone();
        let e = s.apply(&cmd).expect_err(&format!("{cmd:?} must be refused"));
        assert!(e.to_string().contains(want), "{cmd:?}: got {e:?} ({e}), want {want:?}");
        assert_eq!(s, s0, "a refused command changed the state: {cmd:?}");
    }
    // The same data address for a second node.
    let mut s = s0.clone();
    let Command::AddNode(mut n) = node(2) else { unreachable!() };
    n.id = "node3".into();
    assert!(matches!(s.apply(&Command::AddNode(n)), Err(StateError::DataAddressTaken { .. })));
}

#[test]
fn a_subnet_runs_out_and_says_so() {
    let mut s = ClusterState::new();
    s.apply(&node(1)).unwrap();
    s.apply(&network("app", "198.19.0.0/29")).unwrap(); // 6 hosts: gateway + 5
    s.apply(&service("web", Some(80), &[])).unwrap(); // the VIP takes one
    for i in 0..4 {
        s.apply(&task(&format!("t{i}"), "web", "node1")).unwrap();
    }
    assert_eq!(s.apply(&task("t4", "web", "node1")), Err(StateError::SubnetExhausted("app".into())));
}

#[test]
fn the_same_commands_give_the_same_state_and_it_round_trips() {
    let a = cluster();
    let b = cluster();
    assert_eq!(a, b);
    let json = serde_json::to_string(&a).unwrap();
    let back: ClusterState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
}

/// A VIP frame from the local task, through tables compiled from state.
fn vip_syn(s: &ClusterState, sport: u16) -> Vec<u8> {
    let t1 = &s.tasks["web.1"];
    let (vip, port) = s.services["web"].vip.unwrap();
    let gw = mac_for(s.networks["app"].gateway);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(t1.mac.0, gw.0)
        .ipv4(t1.ip.octets(), vip.octets(), 64)
        .tcp(sport, port, 1, 64000)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

fn run(t: &Tables, st: &mut WorkerState, port: &str, input: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + 2048];
    buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let mut f = Frame::new(&mut buf, HEADROOM, input.len()).unwrap();
    let v = process(&mut f, t.port_id(port).unwrap(), 1, t, st);
    (v, f.data().to_vec())
}

#[test]
fn compiled_tables_are_accepted_and_balance_across_nodes() {
    let s = cluster();
    let spec = compile(&s, "node1", &|_| true, 7).unwrap();
    assert_eq!(spec.version, 7);
    assert_eq!(spec.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web.1"]);
    let t = Tables::compile(&spec).unwrap();
    let mut st = WorkerState::for_tables(&t);
    // rr: the first connection to web.1 (local), the second to web.2 on
    // node 2 (VXLAN toward 198.18.0.2).
    let (v1, o1) = run(&t, &mut st, "web.1", &vip_syn(&s, 40001));
    assert_eq!(v1, Verdict::Tx(t.port_id("web.1").unwrap()), "hairpin to the local task");
    assert_eq!(&o1[30..34], &s.tasks["web.1"].ip.octets());
    let (v2, o2) = run(&t, &mut st, "web.1", &vip_syn(&s, 40002));
    assert_eq!(v2, Verdict::Tx(0));
    assert_eq!(&o2[30..34], &[198, 18, 0, 2], "outer destination: node 2");
    assert_eq!(&o2[50 + 30..50 + 34], &s.tasks["web.2"].ip.octets(), "inner destination: web.2");
}

#[test]
fn a_node_that_is_down_or_drained_gets_no_connections() {
    let mut s = cluster();
    // Node 2 down: its task is no endpoint and no backend of node 1.
    let spec = compile(&s, "node1", &|n| n != "node2", 1).unwrap();
    assert!(spec.endpoints.iter().all(|e| e.ip != s.tasks["web.2"].ip));
    assert_eq!(spec.services[0].backends.len(), 1);
    let t = Tables::compile(&spec).unwrap();
    let mut st = WorkerState::for_tables(&t);
    for sport in 41000..41004 {
        let (v, _) = run(&t, &mut st, "web.1", &vip_syn(&s, sport));
        assert_eq!(v, Verdict::Tx(t.port_id("web.1").unwrap()), "only the live backend");
    }
    // Node 2 drained: its task stays, at weight 0.
    s.apply(&Command::SetAvailability { id: "node2".into(), availability: Availability::Drain }).unwrap();
    let spec = compile(&s, "node1", &|_| true, 2).unwrap();
    let w: Vec<u32> = spec.services[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(w, [1, 0]);
    assert!(Tables::compile(&spec).is_ok());
    assert!(compile(&s, "node9", &|_| true, 3).is_err());
}

#[test]
fn compiled_tables_survive_a_toml_file() {
    // `meshplane lab` hands each node its tables as a file.
    let s = cluster();
    let spec = compile(&s, "node2", &|_| true, 3).unwrap();
    let text = toml::to_string(&spec).unwrap();
    let back: meshplane_dataplane::tables::TablesSpec = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let (a, b) = (Tables::compile(&spec).unwrap(), Tables::compile(&back).unwrap());
    assert_eq!(a.ports.len(), b.ports.len());
    assert_eq!(toml::to_string(&back).unwrap(), text, "the same file again");
}

#[test]
fn a_service_update_publishes_and_withdraws_ports() {
    let mut s = cluster();
    s.apply(&service("api", None, &[(Some(30100), MeshMode::Nat)])).unwrap();
    let upd = |add: &[(Option<u16>, MeshMode)], rm: &[u16], sched: Option<Scheduler>| Command::UpdateService {
        name: "web".into(),
        scheduler: sched,
        publish_add: add.iter().map(|&(port, mode)| PublishRequest { port, mode }).collect(),
        publish_rm: rm.to_vec(),
    };
    // Add a chosen port and an automatic one (the lowest free: 30001),
    // change the scheduler.
    s.apply(&upd(&[(Some(30081), MeshMode::PreserveSource), (None, MeshMode::Nat)], &[], Some(Scheduler::Mh))).unwrap();
    let ports = |s: &ClusterState| s.services["web"].published.iter().map(|p| (p.port, p.mode)).collect::<Vec<_>>();
    assert_eq!(ports(&s), [(30000, MeshMode::Nat), (30081, MeshMode::PreserveSource), (30001, MeshMode::Nat)]);
    assert_eq!(s.services["web"].scheduler, Scheduler::Mh);
    // Withdraw one and re-publish it in the other mode in one update.
    s.apply(&upd(&[(Some(30000), MeshMode::PreserveSource)], &[30000], None)).unwrap();
    assert!(ports(&s).contains(&(30000, MeshMode::PreserveSource)));
    // Refused, and nothing changes: another service's port, a port twice,
    // a port not published, an unknown service, a service left with no
    // VIP and no port.
    let before = s.clone();
    let taken = s.apply(&upd(&[(Some(30100), MeshMode::Nat)], &[], None)).unwrap_err();
    assert!(taken.to_string().contains("30100") && taken.to_string().contains("api"), "{taken}");
    assert!(s.apply(&upd(&[(Some(30081), MeshMode::Nat)], &[], None)).is_err());
    assert_eq!(
        s.apply(&upd(&[], &[31999], None)),
        Err(StateError::NotPublished { service: "web".into(), port: 31999 })
    );
    let api_rm =
        Command::UpdateService { name: "api".into(), scheduler: None, publish_add: vec![], publish_rm: vec![30100] };
    assert!(matches!(s.apply(&api_rm), Err(StateError::Unreachable(_))));
    let nosuch =
        Command::UpdateService { name: "nosuch".into(), scheduler: None, publish_add: vec![], publish_rm: vec![] };
    assert!(matches!(s.apply(&nosuch), Err(StateError::Unknown { .. })));
    assert_eq!(s, before);
}
