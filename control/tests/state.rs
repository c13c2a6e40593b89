//! The state model: allocation, validation, determinism, and compilation
//! into a node's tables that the dataplane accepts and forwards by.

use meshplane_control::compile::compile;
use meshplane_control::state::{
    Availability, ClusterState, Command, HealthCheck, HealthUpdate, Kind, Node, Probe, PublishRequest, Role,
    StateError, TaskHealth, mac_for,
};
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
        underlay_mtu: 1500,
    })
}

fn network(name: &str, subnet: &str) -> Command {
    network_mtu(name, subnet, None)
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
        endpoint_mode: meshplane_control::state::EndpointMode::Vip,
        health: None,
    }
}

fn task(id: &str, service: &str, node: &str) -> Command {
    Command::AttachTask {
        id: id.into(),
        service: service.into(),
        node: node.into(),
        weight: 1,
        netns: None,
        container: None,
    }
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
                internal: false,
            },
            "gateway 198.19.7.1 is not a host address of 198.19.6.0/24",
        ),
        (
            service("again", None, &[(Some(30000), MeshMode::Nat)]),
            "port 30000/tcp is already published by service \"web\"",
        ),
        (service("web", Some(80), &[]), "service \"web\" already exists"),
        (
            Command::CreateService {
                name: "x".into(),
                network: "nope".into(),
                protocol: Proto::Udp,
                vip_port: Some(53),
                target_port: 53,
                publish: vec![],
                scheduler: Scheduler::Mh,
                endpoint_mode: meshplane_control::state::EndpointMode::Vip,
                health: None,
            },
            "no network \"nope\"",
        ),
        (task("web.1", "web", "node2"), "task \"web.1\" already exists"),
        (task("t", "web", "node9"), "no node \"node9\""),
        (task("t", "nope", "node1"), "no service \"nope\""),
        (Command::RemoveNetwork { name: "app".into() }, "network \"app\" is used by service \"web\""),
        (task("bad name!", "web", "node1"), "task name \"bad name!\""),
        (task("a-twenty-two-char.id.x", "web", "node1"), "1 to 21 characters"),
        (service("sixteen-chars-xx", Some(80), &[]), "service name \"sixteen-chars-xx\": 1 to 15 characters"),
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
        health: Default::default(),
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
    // a port not published, an unknown service.
    let before = s.clone();
    let taken = s.apply(&upd(&[(Some(30100), MeshMode::Nat)], &[], None)).unwrap_err();
    assert!(taken.to_string().contains("30100") && taken.to_string().contains("api"), "{taken}");
    assert!(s.apply(&upd(&[(Some(30081), MeshMode::Nat)], &[], None)).is_err());
    assert_eq!(
        s.apply(&upd(&[], &[31999], None)),
        Err(StateError::NotPublished { service: "web".into(), port: 31999 })
    );
    let nosuch = Command::UpdateService {
        name: "nosuch".into(),
        scheduler: None,
        publish_add: vec![],
        publish_rm: vec![],
        health: Default::default(),
    };
    assert!(matches!(s.apply(&nosuch), Err(StateError::Unknown { .. })));
    assert_eq!(s, before);
    // A service whose last published port goes keeps its VIP (every
    // vip-mode service has one, on every port without --vip-port).
    let api_rm = Command::UpdateService {
        name: "api".into(),
        scheduler: None,
        publish_add: vec![],
        publish_rm: vec![30100],
        health: Default::default(),
    };
    s.apply(&api_rm).unwrap();
    assert!(s.services["api"].published.is_empty());
    assert!(matches!(s.services["api"].vip, Some((_, 0))), "{:?}", s.services["api"].vip);
}

#[test]
fn every_vip_mode_service_has_a_vip_on_every_port_unless_a_vip_port_maps_one() {
    let mut s = cluster();
    s.apply(&service("plain", None, &[])).unwrap();
    s.apply(&service("mapped", Some(80), &[])).unwrap();
    let (a, b) = (s.services["plain"].vip.unwrap(), s.services["mapped"].vip.unwrap());
    assert_eq!((a.1, b.1), (0, 80));
    assert_ne!(a.0, b.0);
    // The tables: port 0 for the every-port VIP, compiled by the dataplane.
    let spec = compile(&s, "node1", &|_| true, 1).unwrap();
    let plain = spec.services.iter().find(|x| x.name == "plain").unwrap();
    assert_eq!((plain.vip, plain.port), (Some(a.0), Some(0)));
    Tables::compile(&spec).unwrap();
}

/// Node `n` with an underlay (data NIC) MTU of `mtu`.
fn node_mtu(n: u8, mtu: u16) -> Command {
    let Command::AddNode(nd) = node(n) else { unreachable!("node() adds a node") };
    Command::AddNode(Node { underlay_mtu: mtu, ..nd })
}

fn network_mtu(name: &str, subnet: &str, mtu: Option<u16>) -> Command {
    Command::CreateNetwork { name: name.into(), subnet: subnet.parse().unwrap(), gateway: None, mtu, internal: false }
}

fn state_of(cmds: &[Command]) -> ClusterState {
    let mut s = ClusterState::new();
    for c in cmds {
        s.apply(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    s
}

#[test]
fn a_network_mtu_is_checked_against_the_smallest_underlay() {
    // A jumbo node and a 1500-byte one: 1450 at most, and the error names
    // the node that limits it.
    let mut s = state_of(&[node_mtu(1, 9000), node_mtu(2, 1500)]);
    let before = s.clone();
    let e = s.apply(&network_mtu("big", "198.19.0.0/24", Some(9000))).unwrap_err();
    assert_eq!(e, StateError::MtuAboveUnderlay { mtu: 9000, node: "node2".into(), underlay_mtu: 1500 });
    assert_eq!(
        e.to_string(),
        "mtu 9000 is too large: node \"node2\"'s underlay MTU is 1500, so a network's MTU is at most 1450 (VXLAN takes 50)"
    );
    assert!(matches!(
        s.apply(&network_mtu("big", "198.19.0.0/24", Some(1451))),
        Err(StateError::MtuAboveUnderlay { mtu: 1451, underlay_mtu: 1500, .. })
    ));
    assert_eq!(s, before, "a refused network changes nothing");
    s.apply(&network_mtu("ok", "198.19.0.0/24", Some(1450))).unwrap();
    assert_eq!(s.apply(&network_mtu("tiny", "198.19.1.0/24", Some(67))), Err(StateError::BadMtu(67)));

    // Every node jumbo: up to 8950, the default stays 1450.
    let mut j = state_of(&[node_mtu(1, 9000), node_mtu(2, 9000)]);
    j.apply(&network_mtu("jumbo", "198.19.0.0/24", Some(8950))).unwrap();
    assert_eq!(j.networks["jumbo"].mtu, 8950);
    assert!(matches!(
        j.apply(&network_mtu("over", "198.19.1.0/24", Some(8951))),
        Err(StateError::MtuAboveUnderlay { mtu: 8951, underlay_mtu: 9000, .. })
    ));
    j.apply(&network("plain", "198.19.2.0/24")).unwrap();
    assert_eq!(j.networks["plain"].mtu, 1450);

    // A node on a smaller underlay: the default shrinks to fit it.
    let mut small = state_of(&[node_mtu(1, 1400)]);
    small.apply(&network("app", "198.19.0.0/24")).unwrap();
    assert_eq!(small.networks["app"].mtu, 1350);
}

#[test]
fn a_node_whose_underlay_is_too_small_for_a_network_is_refused_at_join() {
    let mut s = state_of(&[node_mtu(1, 9000), network_mtu("jumbo", "198.19.0.0/24", Some(8950))]);
    let before = s.clone();
    let e = s.apply(&node_mtu(2, 1500)).unwrap_err();
    assert_eq!(
        e,
        StateError::UnderlayTooSmall { node: "node2".into(), underlay_mtu: 1500, network: "jumbo".into(), mtu: 8950 }
    );
    let msg = e.to_string();
    assert!(msg.contains("node \"node2\"'s underlay MTU 1500") && msg.contains("needs an underlay of 9000"), "{msg}");
    assert_eq!(s, before);
    // Large enough: joins.
    s.apply(&node_mtu(2, 9000)).unwrap();
    // An underlay that cannot carry even 68 bytes inside VXLAN.
    assert_eq!(s.apply(&node_mtu(3, 117)), Err(StateError::BadUnderlayMtu { node: "node3".into(), mtu: 117 }));
}

#[test]
fn the_data_path_port_is_chosen_before_nodes_and_follows_dockers_rule() {
    let mut s = ClusterState::new();
    assert_eq!(s.data_path_port, 4789);
    for bad in [0u16, 80, 1023, 49152, 65535] {
        assert_eq!(s.apply(&Command::SetDataPathPort { port: bad }), Err(StateError::BadDataPathPort(bad)), "{bad}");
    }
    s.apply(&Command::SetDataPathPort { port: 4790 }).unwrap();
    s.apply(&node(1)).unwrap();
    assert_eq!(s.apply(&Command::SetDataPathPort { port: 5000 }), Err(StateError::DataPathPortFixed));
    assert_eq!(s.data_path_port, 4790);
    // Every node's tables use it, and each node's own underlay MTU; an
    // internal network is marked internal.
    s.apply(&node_mtu(2, 9000)).unwrap();
    s.apply(&Command::CreateNetwork {
        name: "app".into(),
        subnet: "198.19.0.0/24".parse().unwrap(),
        gateway: None,
        mtu: None,
        internal: true,
    })
    .unwrap();
    let one = compile(&s, "node1", &|_| true, 1).unwrap();
    let two = compile(&s, "node2", &|_| true, 1).unwrap();
    assert_eq!((one.node.vxlan_port, one.node.underlay_mtu), (4790, 1500));
    assert_eq!((two.node.vxlan_port, two.node.underlay_mtu), (4790, 9000));
    assert!(one.networks[0].internal);
    let t = Tables::compile(&two).unwrap();
    assert_eq!((t.vxlan_port, t.underlay_mtu, t.networks[0].internal), (4790, 9000, true));
}

#[test]
fn a_state_older_than_the_mtu_port_and_internal_fields_loads_with_the_defaults() {
    let s = cluster();
    let mut v = serde_json::to_value(&s).unwrap();
    v.as_object_mut().unwrap().remove("data_path_port");
    for n in v["nodes"].as_object_mut().unwrap().values_mut() {
        assert!(n.as_object_mut().unwrap().remove("underlay_mtu").is_some());
    }
    for n in v["networks"].as_object_mut().unwrap().values_mut() {
        assert!(n.as_object_mut().unwrap().remove("internal").is_some());
    }
    let old: ClusterState = serde_json::from_value(v).unwrap();
    assert_eq!(old, s, "1500-byte underlays, port 4789, networks not internal");
    assert_eq!((old.data_path_port, old.nodes["node1"].underlay_mtu), (4789, 1500));
    // An old log entry: CreateNetwork without `internal`.
    let cmd: Command =
        serde_json::from_str(r#"{"CreateNetwork":{"name":"n","subnet":"198.19.9.0/24","gateway":null,"mtu":null}}"#)
            .unwrap();
    assert_eq!(cmd, network_mtu("n", "198.19.9.0/24", None));
}

#[test]
fn a_dnsrr_service_is_no_balancer_but_its_tasks_keep_their_ports() {
    let mut s = cluster();
    let db = Command::CreateService {
        name: "db".into(),
        network: "app".into(),
        protocol: Proto::Tcp,
        vip_port: None,
        target_port: 5432,
        publish: vec![],
        scheduler: Scheduler::Rr,
        endpoint_mode: meshplane_control::state::EndpointMode::Dnsrr,
        health: None,
    };
    for c in [db, task("db.1", "db", "node1")] {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let spec = compile(&s, "node1", &|_| true, 9).unwrap();
    assert_eq!(spec.services.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["web"], "no balancer for db");
    assert!(spec.ports.iter().any(|p| p.name == "db.1"), "its task has its port");
    assert!(Tables::compile(&spec).is_ok());
}

#[test]
fn the_zone_of_a_node_is_its_tasks_networks_and_who_serves() {
    let mut s = cluster();
    for c in [
        network("other", "198.19.5.0/24"),
        Command::CreateService {
            name: "far".into(),
            network: "other".into(),
            protocol: Proto::Tcp,
            vip_port: Some(80),
            target_port: 80,
            publish: vec![],
            scheduler: Scheduler::Rr,
            endpoint_mode: meshplane_control::state::EndpointMode::Vip,
            health: None,
        },
        task("far.1", "far", "node2"),
    ] {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let z = meshplane_control::compile::zone(&s, "node1", &|n| n != "node2");
    assert_eq!(z.networks.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["app"], "only its tasks' networks");
    let app = &z.networks[0];
    assert_eq!(app.services.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["web"]);
    assert!(app.services[0].vip.is_some());
    let serving: Vec<(&str, bool)> = app.tasks.iter().map(|t| (t.name.as_str(), t.serving)).collect();
    assert_eq!(serving, [("web.1", true), ("web.2", false)], "node2 is down: its task is not serving");
    // The names answer through the view.
    let v = meshplane_dns::view::View::build(app);
    let web1 = s.tasks["web.1"].ip;
    assert_eq!(v.lookup("tasks.web", meshplane_dns::view::Kind::A), meshplane_dns::view::Lookup::A(vec![web1]));
}

#[test]
fn host_mode_ports_open_only_where_a_task_runs_and_go_to_its_own_tasks() {
    let mut s = cluster();
    s.apply(&service("hm", None, &[(Some(30300), MeshMode::Host), (Some(30301), MeshMode::Nat)])).unwrap();
    s.apply(&task("hm.1", "hm", "node1")).unwrap();
    s.apply(&task("hm.2", "hm", "node1")).unwrap();
    // A dnsrr service may be published in host mode (it needs no VIP).
    let mut db = service("db", None, &[(Some(30302), MeshMode::Host)]);
    if let Command::CreateService { endpoint_mode, .. } = &mut db {
        *endpoint_mode = meshplane_control::state::EndpointMode::Dnsrr;
    }
    s.apply(&db).unwrap();
    let hm_ips = [s.tasks["hm.1"].ip, s.tasks["hm.2"].ip];
    let one = compile(&s, "node1", &|_| true, 1).unwrap();
    let host = one.services.iter().find(|x| x.name == "hm@host").expect("node1 publishes hm in host mode");
    assert_eq!(
        host.published.iter().map(|p| (p.port, p.mode)).collect::<Vec<_>>(),
        [(30300, MeshMode::PreserveSource)]
    );
    assert_eq!(host.backends.iter().map(|b| b.ip).collect::<Vec<_>>(), hm_ips);
    assert_eq!(host.vip, None);
    // The service itself keeps its VIP and its routing-mesh port only.
    let hm = one.services.iter().find(|x| x.name == "hm").expect("hm");
    assert_eq!(hm.published.iter().map(|p| p.port).collect::<Vec<_>>(), [30301]);
    Tables::compile(&one).unwrap();
    // node2 runs no task of hm: no host-mode port there; db has no task.
    let two = compile(&s, "node2", &|_| true, 1).unwrap();
    assert!(two.services.iter().all(|x| !x.name.ends_with("@host")), "{:?}", two.services);
    Tables::compile(&two).unwrap();
    // dnsrr: still no routing mesh.
    let mut bad = service("db2", None, &[(Some(30303), MeshMode::Nat)]);
    if let Command::CreateService { endpoint_mode, .. } = &mut bad {
        *endpoint_mode = meshplane_control::state::EndpointMode::Dnsrr;
    }
    assert!(matches!(s.apply(&bad), Err(StateError::DnsrrPublished(_))));
}

fn tcp_check(interval_ms: u64, timeout_ms: u64, retries: u32) -> HealthCheck {
    HealthCheck { probe: Probe::Tcp, interval_ms, timeout_ms, retries, start_period_ms: 0 }
}

fn health_update(name: &str, health: HealthUpdate) -> Command {
    Command::UpdateService { name: name.into(), scheduler: None, publish_add: vec![], publish_rm: vec![], health }
}

fn checked_service(name: &str, health: HealthCheck) -> Command {
    let mut c = service(name, Some(80), &[]);
    if let Command::CreateService { health: h, .. } = &mut c {
        *h = Some(health);
    }
    c
}

fn set_health(task: &str, health: TaskHealth) -> Command {
    Command::SetTaskHealth { task: task.into(), health }
}

#[test]
fn health_checks_are_validated_with_clear_errors_and_change_nothing() {
    let mut s = cluster();
    let http = |path: &str| HealthCheck { probe: Probe::Http { path: path.into() }, ..tcp_check(5000, 2000, 3) };
    let hour = 3_600_000;
    for (bad, want, says) in [
        (tcp_check(0, 0, 3), StateError::HealthInterval(0), "interval 0 ms"),
        (tcp_check(hour + 1, 1000, 3), StateError::HealthInterval(hour + 1), "at most 1h"),
        (tcp_check(5000, 0, 3), StateError::HealthTimeout(0), "timeout 0 ms"),
        (
            tcp_check(1000, 2000, 3),
            StateError::HealthTimeoutAboveInterval { timeout_ms: 2000, interval_ms: 1000 },
            "longer than its interval",
        ),
        (tcp_check(5000, 2000, 0), StateError::HealthRetries(0), "retries 0: 1 to 100"),
        (tcp_check(5000, 2000, 101), StateError::HealthRetries(101), "retries 101"),
        (
            HealthCheck { start_period_ms: hour + 1, ..tcp_check(5000, 2000, 3) },
            StateError::HealthStartPeriod(hour + 1),
            "start period",
        ),
        (http("healthz"), StateError::HealthPath("healthz".into()), "starts with '/'"),
        (http(""), StateError::HealthPath(String::new()), "path \"\""),
        (http("/a b"), StateError::HealthPath("/a b".into()), "no spaces"),
        (http("/a\r\nX: y"), StateError::HealthPath("/a\r\nX: y".into()), "visible ASCII"),
    ] {
        let before = s.clone();
        let e = s.apply(&checked_service("api", bad.clone())).expect_err("refused at create");
        assert_eq!(e, want);
        assert!(e.to_string().contains(says), "{e}");
        assert_eq!(s.apply(&health_update("web", HealthUpdate::Set(bad))), Err(want), "refused at update");
        assert_eq!(s, before, "a refused command changes nothing");
    }
    // The bounds themselves are fine.
    for ok in [tcp_check(1, 1, 1), tcp_check(hour, hour, 100), http("/"), http("/healthz?full=1")] {
        let mut s2 = s.clone();
        s2.apply(&checked_service("api", ok.clone())).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        assert_eq!(s2.services["api"].health, Some(ok));
    }
}

#[test]
fn a_tasks_health_starts_moves_by_its_nodes_reports_and_refuses_what_makes_no_sense() {
    let mut s = cluster();
    s.apply(&checked_service("api", tcp_check(1000, 500, 3))).unwrap();
    s.apply(&task("api.1", "api", "node1")).unwrap();
    assert_eq!(s.tasks["api.1"].health, TaskHealth::Starting, "a new task of a checked service");
    assert_eq!(s.tasks["web.1"].health, TaskHealth::Unchecked, "a task of a service without a check");
    s.apply(&set_health("api.1", TaskHealth::Healthy)).unwrap();
    assert_eq!(s.tasks["api.1"].health, TaskHealth::Healthy);
    let before = s.clone();
    s.apply(&set_health("api.1", TaskHealth::Healthy)).expect("the same again");
    assert_eq!(s, before, "no change");
    s.apply(&set_health("api.1", TaskHealth::Unhealthy)).unwrap();
    assert_eq!(s.tasks["api.1"].health, TaskHealth::Unhealthy);
    let before = s.clone();
    for (cmd, want) in [
        (set_health("api.9", TaskHealth::Healthy), StateError::Unknown { kind: Kind::Task, name: "api.9".into() }),
        (set_health("api.1", TaskHealth::Unchecked), StateError::HealthUnchecked("api.1".into())),
        (
            set_health("web.1", TaskHealth::Unhealthy),
            StateError::NoHealthCheck { task: "web.1".into(), service: "web".into() },
        ),
    ] {
        assert_eq!(s.apply(&cmd), Err(want.clone()), "{cmd:?}");
        assert!(!want.to_string().is_empty());
        assert_eq!(s, before);
    }
    // A check added to a running service: its tasks keep serving until
    // their node's first probe answers.
    s.apply(&health_update("web", HealthUpdate::Set(tcp_check(2000, 1000, 2)))).unwrap();
    assert_eq!(s.services["web"].health, Some(tcp_check(2000, 1000, 2)));
    assert_eq!(s.tasks["web.1"].health, TaskHealth::Unchecked);
    s.apply(&set_health("web.1", TaskHealth::Unhealthy)).unwrap();
    // A check changed: the health stays until the next probe.
    s.apply(&health_update("web", HealthUpdate::Set(tcp_check(3000, 1000, 2)))).unwrap();
    assert_eq!(s.tasks["web.1"].health, TaskHealth::Unhealthy);
    // Removed: every task of the service unchecked (serving), the others'
    // untouched.
    s.apply(&health_update("web", HealthUpdate::Remove)).unwrap();
    assert_eq!((s.services["web"].health.as_ref(), s.tasks["web.1"].health), (None, TaskHealth::Unchecked));
    assert_eq!(s.tasks["api.1"].health, TaskHealth::Unhealthy);
    // An update that is refused for another reason keeps the check.
    let e = s.apply(&Command::UpdateService {
        name: "api".into(),
        scheduler: None,
        publish_add: vec![],
        publish_rm: vec![31999],
        health: HealthUpdate::Remove,
    });
    assert!(e.is_err());
    assert!(s.services["api"].health.is_some());
}

#[test]
fn a_node_reports_the_health_of_its_own_tasks_only() {
    use meshplane_control::authz::reports_itself;
    let mut s = cluster();
    s.apply(&health_update("web", HealthUpdate::Set(tcp_check(1000, 500, 3)))).unwrap();
    assert!(reports_itself(&set_health("web.1", TaskHealth::Healthy), "node1", &s));
    assert!(!reports_itself(&set_health("web.2", TaskHealth::Healthy), "node1", &s), "node2's task");
    assert!(!reports_itself(&set_health("web.9", TaskHealth::Healthy), "node1", &s), "no such task");
}

#[test]
fn a_state_and_commands_older_than_health_checks_load_as_unchecked() {
    let s = cluster();
    let mut v = serde_json::to_value(&s).unwrap();
    for sv in v["services"].as_object_mut().unwrap().values_mut() {
        assert!(sv.as_object_mut().unwrap().remove("health").is_some());
    }
    for t in v["tasks"].as_object_mut().unwrap().values_mut() {
        assert!(t.as_object_mut().unwrap().remove("health").is_some());
    }
    let old: ClusterState = serde_json::from_value(v).unwrap();
    assert_eq!(old, s);
    assert!(old.tasks.values().all(|t| t.health == TaskHealth::Unchecked && t.health.serves()));
    // Log entries written before the field.
    let create = r#"{"CreateService":{"name":"w","network":"app","protocol":"tcp","vip_port":80,"target_port":80,"publish":[],"scheduler":"rr"}}"#;
    match serde_json::from_str::<Command>(create).unwrap() {
        Command::CreateService { health, .. } => assert_eq!(health, None),
        other => panic!("{other:?}"),
    }
    let update = r#"{"UpdateService":{"name":"w","scheduler":null,"publish_add":[],"publish_rm":[]}}"#;
    match serde_json::from_str::<Command>(update).unwrap() {
        Command::UpdateService { health, .. } => assert_eq!(health, HealthUpdate::Keep),
        other => panic!("{other:?}"),
    }
    // And what the new fields look like in the log and the state.
    let c = serde_json::to_string(&checked_service("w", tcp_check(5000, 2000, 3))).unwrap();
    assert!(
        c.contains(r#""health":{"probe":"tcp","interval_ms":5000,"timeout_ms":2000,"retries":3,"start_period_ms":0}"#),
        "{c}"
    );
    let h = HealthCheck { probe: Probe::Http { path: "/h".into() }, ..tcp_check(5000, 2000, 3) };
    assert!(serde_json::to_string(&h).unwrap().contains(r#""probe":{"http":{"path":"/h"}}"#));
    assert_eq!(serde_json::to_string(&TaskHealth::Unchecked).unwrap(), r#""none""#);
    assert_eq!(
        serde_json::to_string(&set_health("t", TaskHealth::Unhealthy)).unwrap(),
        r#"{"SetTaskHealth":{"task":"t","health":"unhealthy"}}"#
    );
}

#[test]
fn a_task_that_is_starting_or_unhealthy_is_no_backend_and_no_answer_but_keeps_its_port() {
    use meshplane_control::compile::{Serving, serving, zone};
    let mut s = cluster();
    s.apply(&health_update("web", HealthUpdate::Set(tcp_check(1000, 500, 3)))).unwrap();
    s.apply(&task("web.3", "web", "node1")).unwrap();
    let (w1, w2, w3) = (s.tasks["web.1"].ip, s.tasks["web.2"].ip, s.tasks["web.3"].ip);
    // web.1 unchecked (serving), web.2 unhealthy, web.3 starting.
    s.apply(&set_health("web.2", TaskHealth::Unhealthy)).unwrap();
    let all = |_: &str| true;
    let backends = |s: &ClusterState| {
        let spec = compile(s, "node1", &all, 1).unwrap();
        spec.services[0].backends.iter().map(|b| (b.ip, b.weight)).collect::<Vec<_>>()
    };
    let answers = |s: &ClusterState| {
        let z = zone(s, "node1", &all);
        z.networks[0].tasks.iter().map(|t| (t.name.clone(), t.serving)).collect::<Vec<_>>()
    };
    assert_eq!(backends(&s), [(w1, 1)], "neither the unhealthy nor the starting task");
    assert_eq!(answers(&s), [("web.1".into(), true), ("web.2".into(), false), ("web.3".into(), false)]);
    // The tasks keep their ports, endpoints and names.
    let spec = compile(&s, "node1", &all, 1).unwrap();
    assert!(spec.ports.iter().any(|p| p.name == "web.3"));
    assert!(spec.endpoints.iter().any(|e| e.ip == w2) && spec.endpoints.iter().any(|e| e.ip == w3));
    // Every new connection goes to web.1 (frames through the pipeline).
    let t = Tables::compile(&spec).unwrap();
    let mut st = WorkerState::for_tables(&t);
    for sport in 42000..42006 {
        let (v, o) = run(&t, &mut st, "web.1", &vip_syn(&s, sport));
        assert_eq!(v, Verdict::Tx(t.port_id("web.1").unwrap()), "only the serving backend");
        assert_eq!(&o[30..34], &w1.octets());
    }
    // Healthy: back in both; drained: a draining backend, not answered.
    s.apply(&set_health("web.2", TaskHealth::Healthy)).unwrap();
    s.apply(&set_health("web.3", TaskHealth::Healthy)).unwrap();
    assert_eq!(backends(&s), [(w1, 1), (w2, 1), (w3, 1)]);
    assert!(answers(&s).iter().all(|(_, serving)| *serving));
    s.apply(&Command::SetAvailability { id: "node2".into(), availability: Availability::Drain }).unwrap();
    assert_eq!(backends(&s), [(w1, 1), (w2, 0), (w3, 1)]);
    assert_eq!(serving(&s, &s.tasks["web.2"], &all), Serving::Draining);
    assert_eq!(answers(&s)[1], ("web.2".into(), false));
    // Unhealthy on a drained node: out altogether; a node that is down too.
    s.apply(&set_health("web.2", TaskHealth::Unhealthy)).unwrap();
    assert_eq!(serving(&s, &s.tasks["web.2"], &all), Serving::No);
    assert_eq!(serving(&s, &s.tasks["web.1"], &|n: &str| n != "node1"), Serving::No);
}

/// What a command that reached the state from outside cannot do to a
/// node: take its underlay or its own ports' names, its management,
/// gossip or data-path ports, or its gossip identity. Each refusal leaves
/// the state as it was.
#[test]
fn commands_that_would_cut_a_node_off_are_refused() {
    let base = cluster();
    // Refused when proposed (`admit`); a log written before the check
    // still applies as it did, so every node replays the same state.
    let refused = |c: Command, want: &str| {
        let e = base.admit(&c).expect_err(&format!("{c:?} was admitted"));
        assert!(e.to_string().contains(want), "{c:?}: {e}");
        assert!(base.clone().apply(&c).is_ok(), "{c:?}: no longer applies from an old log");
    };
    // Networks over special ranges (169.254/16 holds the host links) or
    // over a node's data address.
    refused(network("ll", "169.254.0.0/16"), "link-local");
    refused(network("lo", "127.0.0.0/24"), "loopback");
    refused(network("mc", "239.1.0.0/16"), "multicast");
    refused(network("zero", "0.0.0.0/8"), "this network");
    refused(network("under", "198.18.0.0/24"), "holds node \"node1\"'s data address 198.18.0.1");
    // A node whose data address is inside a network; one whose management
    // address is another node's.
    let Command::AddNode(mut n3) = node(3) else { unreachable!() };
    n3.data_ip = Ipv4Addr::new(198, 19, 0, 77);
    refused(Command::AddNode(n3), "holds node \"node3\"'s data address 198.19.0.77");
    let Command::AddNode(mut n3) = node(3) else { unreachable!() };
    n3.mgmt = "198.18.1.2:2378".parse().unwrap();
    refused(Command::AddNode(n3), "management address 198.18.1.2 is node \"node2\"'s");
    // Task names that are a node's own ports, or a service's name.
    refused(task("uplink", "web", "node1"), "reserved");
    refused(task("mp-host", "web", "node1"), "reserved");
    assert!(base.admit(&task("mp-hosts", "web", "node1")).is_ok(), "only the names themselves");
    // Published ports the cluster uses (TCP here: management and
    // gossip), on create and on update; the data path's is UDP.
    for (port, what) in [(2377, "management"), (7946, "gossip")] {
        refused(service("x", None, &[(Some(port), MeshMode::Nat)]), what);
        let add = PublishRequest { port: Some(port), mode: MeshMode::Nat };
        refused(
            Command::UpdateService {
                name: "web".into(),
                scheduler: None,
                publish_add: vec![add],
                publish_rm: vec![],
                health: HealthUpdate::default(),
            },
            what,
        );
    }
    let udp = |port: u16| Command::CreateService {
        name: "u".into(),
        network: "app".into(),
        protocol: Proto::Udp,
        vip_port: None,
        target_port: 53,
        publish: vec![PublishRequest { port: Some(port), mode: MeshMode::Nat }],
        scheduler: Scheduler::Rr,
        endpoint_mode: meshplane_control::state::EndpointMode::Vip,
        health: None,
    };
    refused(udp(4789), "data-path");
    refused(udp(7946), "gossip");
    // The data-path port (set at init, before any node) is not chosen
    // among published ones.
    let e = ClusterState::new().admit(&Command::SetDataPathPort { port: 30000 }).expect_err("admitted");
    assert!(e.to_string().contains("range published ports are chosen from"), "{e}");
    // Still fine: a neighbour of each, and the other protocol.
    for c in [
        network("near", "169.253.0.0/16"),
        task("web.3", "web", "node1"),
        service("x", None, &[(Some(2378), MeshMode::Nat)]),
        service("y", None, &[(Some(4789), MeshMode::Nat)]),
        udp(2377),
        Command::SetDataPathPort { port: 4790 },
    ] {
        base.admit(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn internal_commands_are_named_and_marked() {
    assert_eq!(Command::RetireGossipKey { id: 1 }.internal(), Some("RetireGossipKey"));
    assert_eq!(Command::SetDataPathPort { port: 4790 }.internal(), Some("SetDataPathPort"));
    assert_eq!(task("web.3", "web", "node1").internal(), None);
    // The name is the command's JSON tag.
    for c in [Command::RetireGossipKey { id: 1 }, Command::SetDataPathPort { port: 4790 }] {
        let json = serde_json::to_value(&c).unwrap();
        assert!(c.internal().is_some_and(|name| json.get(name).is_some()), "{json}");
    }
}

#[test]
fn a_service_with_the_longest_name_takes_tasks_service_dot_n() {
    // A task id is SERVICE.N (what CNI and `task attach` choose): with a
    // service name of 15 characters it is longer than a name, and must
    // still be accepted (it names no interface).
    let mut s = cluster();
    s.apply(&service("fifteen-chars-x", Some(81), &[])).expect("a 15-character service");
    for id in ["fifteen-chars-x.1", "fifteen-chars-x.99999"] {
        s.apply(&task(id, "fifteen-chars-x", "node1")).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let t = Tables::compile(&compile(&s, "node1", &|_| true, 1).expect("compiles")).expect("tables");
    assert_eq!(t.services.list.iter().find(|x| x.name == "fifteen-chars-x").map(|x| x.backends.len()), Some(2));
}
