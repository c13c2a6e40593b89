//! The routing mesh's ICMP and MSS (issue 18, item 6), as a real client
//! sees them through node 1's published ports, the task on node 2 (network
//! `app`, MTU 1450 on a 1500-byte fabric):
//! - a client whose interface has MTU 9000 (in its own namespace; a SYN
//!   is small enough for the fabric) announces MSS 8960 in its SYN; the
//!   task, across the overlay, captures the SYN with MSS 1410 (1450 − 40);
//! - a UDP datagram of 1500 bytes with DF to a published UDP port is
//!   answered with ICMP fragmentation-needed (MTU 1450) from 198.18.0.1,
//!   captured at the client; the client's kernel learns the path MTU (the
//!   next send fails with EMSGSIZE, `IP_MTU` and `ip route get` say 1450).
//!
//! The node counts both (`mesh_mss_clamped`, `mesh_frag_needed`).

use super::lab::{in_ns_ok, ip, wait_for};
use super::{Cluster, Io, serial, tables};
use crate::need_root;

/// A published UDP port (`nat`) on task 2's echo port.
const UDP_SVC: &str = r#"[[service]]
name = "echo-nat"
protocol = "udp"
network = "app"
target_port = 5002
published = [{ port = 30053, mode = "nat" }]
[[service.backend]]
ip = "198.19.0.2"
"#;

/// Sends a 1472-byte UDP payload (1500 bytes of IPv4) with DF
/// (`IP_PMTUDISC_DO`) to 198.18.0.1:30053 until the kernel refuses to
/// (EMSGSIZE: it learned a smaller path MTU), at most 50 times in 1 s;
/// prints `mtu N` (`IP_MTU`) or exits 1.
const DF_SENDER: &str = r#"
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.connect(("198.18.0.1", 30053))
for _ in range(50):
    try:
        s.send(b"x" * 1472)
    except OSError as e:
        if e.errno != errno.EMSGSIZE:
            raise
        print("mtu", s.getsockopt(socket.IPPROTO_IP, 14))  # IP_MTU
        sys.exit(0)
    time.sleep(0.02)
print("no fragmentation-needed arrived")
sys.exit(1)
"#;

/// Starts `tcpdump -c 1 FILTER` on eth0 in `ns` (verbose, numeric) and
/// waits until it captures; its process index.
fn capture(c: &mut Cluster, ns: &str, name: &str, filter: &str) -> usize {
    let p = c.lab.spawn(ns, name, &["tcpdump", "-i", "eth0", "-nn", "-v", "-l", "-c", "1", filter]);
    let lab = &mut c.lab;
    wait_for(&format!("{name} to listen"), 5, || {
        assert!(lab.running(p), "{name} exited: {}", lab.log(p));
        lab.log(p).contains("listening on")
    });
    p
}

/// What capture `p` caught (waits for its one packet).
fn caught(c: &mut Cluster, p: usize) -> String {
    let lab = &mut c.lab;
    wait_for("the capture", 5, || !lab.running(p));
    lab.log(p)
}

fn mesh_icmp(io: Io) {
    let _g = serial();
    let mut c = Cluster::fabric(&format!("mi-{}", io.arg()), io);
    c.add_node(1, &tables(1, true, UDP_SVC));
    c.add_node(2, &tables(2, true, UDP_SVC));
    let client = c.client();
    let t2 = c.tasks[1].clone();

    // MSS: the client announces 8960, the task sees 1410.
    ip(&format!("-n {client} link set eth0 mtu 9000"));
    let syn = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn";
    let at_client = capture(&mut c, &client, "tcpdump-client", syn);
    let at_task = capture(&mut c, &t2, "tcpdump-task", syn);
    let nat = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30080", 200_000);
    assert!(nat.ends_with("bytes=200000 ok"), "nat mode: {nat}");
    let sent = caught(&mut c, at_client);
    assert!(sent.contains("198.18.0.100.") && sent.contains("mss 8960"), "the client's SYN:\n{sent}");
    let got = caught(&mut c, at_task);
    assert!(got.contains("> 198.19.0.2.5001") && got.contains("mss 1410,"), "the SYN at the task:\n{got}");
    ip(&format!("-n {client} link set eth0 mtu 1500"));

    // Frag-needed: the published UDP port works for datagrams that fit ...
    let u = c.udp(&client, &t2, "198.19.0.2:5002", "198.18.0.1:30053", 3);
    assert!(u.starts_with("udp: 3/3"), "{u}");
    // ... and one too large for the network, with DF, is answered.
    let icmp = capture(&mut c, &client, "tcpdump-icmp", "icmp");
    let out = in_ns_ok(&client, &["python3", "-c", DF_SENDER]);
    assert_eq!(out.trim(), "mtu 1450", "the client's socket");
    let got = caught(&mut c, icmp);
    // From the published address, no DF, quoting the client's datagram.
    assert!(
        got.contains("flags [none], proto ICMP (1), length 56")
            && got.contains(
                "198.18.0.1 > 198.18.0.100: ICMP 198.18.0.1 unreachable - need to frag (mtu 1450), length 36"
            )
            && got.contains("flags [DF], proto UDP (17), length 1500)")
            && got.contains(" > 198.18.0.1.30053: UDP, length 1472"),
        "the ICMP at the client:\n{got}"
    );
    let route = in_ns_ok(&client, &["ip", "route", "get", "198.18.0.1"]);
    assert!(route.contains("mtu 1450"), "the client's route: {route}");

    // Counted (the counters file is rewritten every half second).
    wait_for("node 1 to count", 5, || {
        let w = &c.stats(0)["workers"][0];
        w["mesh_frag_needed"].as_u64() >= Some(1) && w["mesh_mss_clamped"].as_u64() >= Some(1)
    });
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(mesh_icmp: mesh_icmp_afxdp, mesh_icmp_tap);
