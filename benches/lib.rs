//! Criterion benchmarks for meshplane are the other files in `benches/`
//! (`cargo bench -p meshplane-benches`); this library holds the frames the
//! benches and `examples/icount.rs` share.

/// A 64-byte UDP frame from task1 (198.19.0.1) to the remote task 198.19.0.2.
pub fn task_frame(i: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2])
        .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
        .udp(10000 + i, 5001)
        .write(&mut f, &[0x5a; 22])
        .unwrap();
    f
}

/// The same flow direction arriving from node 2, VXLAN-encapsulated, for task1.
pub fn uplink_frame(i: u16) -> Vec<u8> {
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1])
        .ipv4([198, 19, 0, 2], [198, 19, 0, 1], 64)
        .udp(10000 + i, 5001)
        .write(&mut inner, &[0x5a; 22])
        .unwrap();
    let mut payload = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0];
    payload.extend_from_slice(&inner);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
        .udp(49152 + i, 4789)
        .write(&mut f, &payload)
        .unwrap();
    f
}

/// A broadcast ARP request from task1 (198.19.0.1) for 198.19.0.2.
pub fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 1, 1, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 1, 1, 198, 19, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 19, 0, 2]);
    f
}

/// An IPv4/TCP packet (no Ethernet header) of flow `i`, for the NAT cases.
pub fn tcp_ip_packet(i: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ipv4([198, 18, 1, 1], [198, 18, 255, 1], 64)
        .tcp(20000 + i, 30080, 1, 64000)
        .ack(1)
        .write(&mut f, &[0x5a; 6])
        .unwrap();
    f
}

/// A TCP frame (a SYN, or an ACK with 6 bytes of data) from task1 to the
/// VIP 198.19.0.100:80 of examples/tables-lb.toml, from source port
/// `sport`, addressed to the gateway's MAC as a task sends it.
pub fn vip_frame(sport: u16, syn: bool) -> Vec<u8> {
    let mut f = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 1], [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe])
        .ipv4([198, 19, 0, 1], [198, 19, 0, 100], 64)
        .tcp(sport, 80, 1, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut f, &[0x5a; 6]).unwrap();
    f
}

/// examples/tables-lb.toml with the VIP service on Maglev (`mh`) and only
/// remote backends (T2 and 198.19.0.4 on node 2), so every balanced frame
/// is DNATed and encapsulated.
pub fn lb_tables() -> meshplane_dataplane::tables::Tables {
    let spec = include_str!("../examples/tables-lb.toml");
    let vip = spec.find("name = \"web-vip\"").expect("web-vip in tables-lb.toml");
    let end = spec[vip..].find("[[service]]").map_or(spec.len(), |e| vip + e);
    let service = "name = \"web-vip\"\nprotocol = \"tcp\"\nnetwork = \"app\"\nvip = \"198.19.0.100\"\nport = 80\n\
                   target_port = 8080\nscheduler = \"mh\"\n[[service.backend]]\nip = \"198.19.0.2\"\n\
                   [[service.backend]]\nip = \"198.19.0.4\"\n\n";
    let extra =
        "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.4\"\nmac = \"02:00:00:00:01:04\"\nvtep = \"198.18.0.2\"\n";
    let text = format!("{}{service}{}\n{extra}", &spec[..vip], &spec[end..]);
    let spec = toml::from_str(&text).expect("bench tables parse");
    meshplane_dataplane::tables::Tables::compile(&spec).expect("bench tables compile")
}
