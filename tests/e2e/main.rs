//! End-to-end tests in network namespaces (root; they skip with a message
//! otherwise): meshplane nodes forward real traffic between real
//! namespaces, with the AF_XDP and the TAP backends.
//!
//! Topology (every address from 198.18.0.0/15):
//! - `fab`: the underlay, a bridge; node n's data address is 198.18.0.n
//!   (MAC 02:00:00:00:00:0n); a client at 198.18.0.100.
//! - node n: a namespace running `meshplane node run`, its uplink on the
//!   fabric (AF_XDP: a veth the kernel also holds the address on; TAP: a
//!   TAP device enslaved to the bridge) and one task port.
//! - task n: a namespace whose eth0 (198.19.0.n, MAC 02:00:00:00:01:0n) is
//!   the other end of the task port; overlay network `app`, VNI 4096.
//!
//! The tests run one at a time (each starts its own nodes).

mod cluster;
mod cni;
mod dns_node;
mod lab;
mod mtu;
mod partition;

use lab::{BIN, Lab, in_ns, in_ns_ok, ip, run, wait_for};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

/// Two tests of `f`, one per I/O backend (root only).
macro_rules! both_backends {
    ($f:ident: $afxdp:ident, $tap:ident) => {
        #[test]
        fn $afxdp() {
            need_root!();
            $f(Io::Afxdp);
        }
        #[test]
        fn $tap() {
            need_root!();
            $f(Io::Tap);
        }
    };
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    Afxdp,
    Tap,
}

impl Io {
    fn arg(self) -> &'static str {
        match self {
            Io::Afxdp => "afxdp",
            Io::Tap => "tap",
        }
    }
}

/// Node n's tables: its task, the other node's task behind the other
/// VTEP, and with `services` the routing-mesh and VIP services (all
/// served by task 2).
fn tables(n: u8, services: bool, extra: &str) -> String {
    let o = 3 - n;
    let mut s = format!(
        r#"version = 1
[node]
data_ip = "198.18.0.{n}"
data_mac = "02:00:00:00:00:0{n}"
[[node.neighbours]]
ip = "198.18.0.{o}"
mac = "02:00:00:00:00:0{o}"
[[network]]
name = "app"
vni = 4096
subnet = "198.19.0.0/24"
gateway_ip = "198.19.0.254"
gateway_mac = "02:42:c6:13:00:fe"
{node_ip}
[[port]]
name = "task{n}"
network = "app"
[[endpoint]]
network = "app"
ip = "198.19.0.{n}"
mac = "02:00:00:00:01:0{n}"
port = "task{n}"
[[endpoint]]
network = "app"
ip = "198.19.0.{o}"
mac = "02:00:00:00:01:0{o}"
vtep = "198.18.0.{o}"
"#,
        node_ip = if services { format!("node_ip = \"198.19.0.{}\"", 249 + n) } else { String::new() }
    );
    if services {
        s += &format!(
            r#"[[endpoint]]
network = "app"
ip = "198.19.0.{oip}"
mac = "02:42:c6:13:00:{omac:02x}"
vtep = "198.18.0.{o}"
[[service]]
name = "web-nat"
protocol = "tcp"
network = "app"
target_port = 5001
published = [{{ port = 30080, mode = "nat" }}]
[[service.backend]]
ip = "198.19.0.2"
[[service]]
name = "web-ps"
protocol = "tcp"
network = "app"
target_port = 5001
published = [{{ port = 30081, mode = "preserve-source" }}]
[[service.backend]]
ip = "198.19.0.2"
[[service]]
name = "echo-vip"
protocol = "udp"
network = "app"
vip = "198.19.0.100"
port = 7
target_port = 5002
[[service.backend]]
ip = "198.19.0.2"
"#,
            oip = 249 + o,
            omac = 249 + o,
        );
    }
    s + extra
}

/// A meshplane node of the cluster.
struct Node {
    ns: String,
    proc_: usize,
    stats: PathBuf,
    tables: PathBuf,
    uplink: &'static str,
}

/// The lab: fabric, nodes, tasks, an optional client.
struct Cluster {
    lab: Lab,
    io: Io,
    /// Workers per node (cores 0..workers); devices get as many queues.
    workers: usize,
    fab: String,
    nodes: Vec<Node>,
    tasks: Vec<String>,
}

/// Sets task n's eth0 up as the endpoint 198.19.0.n, default route via the
/// gateway. Transmit offloads stay on (TAP: super-frames and partial
/// checksums come with a virtio-net header; AF_XDP: the node completes
/// the checksums veth leaves partial).
fn config_task(ns: &str, n: u8) {
    ip(&format!("-n {ns} link set eth0 address 02:00:00:00:01:0{n} mtu 1450 up"));
    ip(&format!("-n {ns} addr add 198.19.0.{n}/24 dev eth0"));
    ip(&format!("-n {ns} route add default via 198.19.0.254"));
}

/// Joins `ns` to the fabric with a veth named `ifname` there (address
/// `addr`/24, MAC `mac`), its peer `fab_if` on the bridge.
fn on_fabric(fab: &str, ns: &str, ifname: &str, fab_if: &str, mac: &str, addr: &str) {
    ip(&format!("link add {fab_if} netns {fab} type veth peer name {ifname} netns {ns}"));
    ip(&format!("-n {fab} link set {fab_if} master br0 up"));
    ip(&format!("-n {ns} link set {ifname} address {mac} up"));
    ip(&format!("-n {ns} addr add {addr}/24 dev {ifname}"));
    in_ns_ok(ns, &["ethtool", "-K", ifname, "tx", "off"]);
}

impl Cluster {
    /// A fabric only.
    fn fabric(tag: &str, io: Io) -> Cluster {
        let mut lab = Lab::new(tag);
        let fab = lab.ns("fab");
        ip(&format!("-n {fab} link add br0 type bridge"));
        ip(&format!("-n {fab} link set br0 up"));
        // A plain switch: br_netfilter (on in new namespaces here) would
        // validate and drop bridged IPv4 the tests send on purpose.
        for f in ["iptables", "ip6tables", "arptables"] {
            let _ = in_ns(&fab, &["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{f}=0")]);
        }
        Cluster { lab, io, workers: 1, fab, nodes: Vec::new(), tasks: Vec::new() }
    }

    /// Adds meshplane node n (1 or 2) with task n, running `tables_toml`.
    fn add_node(&mut self, n: u8, tables_toml: &str) {
        let ns = self.lab.ns(&format!("n{n}"));
        let task = self.lab.ns(&format!("t{n}"));
        let tables = self.lab.dir.join(format!("node{n}.toml"));
        std::fs::write(&tables, tables_toml).expect("writing tables");
        let stats = self.lab.dir.join(format!("stats{n}.json"));
        let q = self.workers;
        let uplink = match self.io {
            Io::Afxdp => {
                let (fab, nif) = (&self.fab, format!("n{n}"));
                ip(&format!(
                    "link add {nif} netns {fab} numtxqueues {q} numrxqueues {q} type veth peer name up0 netns {ns} numtxqueues {q} numrxqueues {q}"
                ));
                ip(&format!("-n {fab} link set {nif} master br0 up"));
                ip(&format!("-n {ns} link set up0 address 02:00:00:00:00:0{n} up"));
                ip(&format!("-n {ns} addr add 198.18.0.{n}/24 dev up0"));
                in_ns_ok(&ns, &["ethtool", "-K", "up0", "tx", "off"]);
                ip(&format!(
                    "link add tp{n} netns {ns} numtxqueues {q} numrxqueues {q} type veth peer name eth0 netns {task} numtxqueues {q} numrxqueues {q}"
                ));
                ip(&format!("-n {ns} link set tp{n} up"));
                config_task(&task, n);
                "up0"
            }
            Io::Tap => {
                // Persistent TAPs the node attaches to, moved into place
                // once it holds them.
                let mq = if q > 1 { " multi_queue" } else { "" };
                ip(&format!("-n {ns} tuntap add dev mpup mode tap{mq}"));
                ip(&format!("-n {ns} tuntap add dev tp{n} mode tap{mq}"));
                "mpup"
            }
        };
        let cores = (0..self.workers).map(|c| c.to_string()).collect::<Vec<_>>().join(",");
        let p = self.lab.spawn(
            &ns,
            &format!("node{n}"),
            &[
                BIN,
                "node",
                "run",
                "--cores",
                &cores,
                "--tables",
                tables.to_str().expect("utf-8 path"),
                "--uplink",
                uplink,
                "--task-port",
                &format!("task{n}=tp{n}"),
                "--io",
                self.io.arg(),
                "--stats-file",
                stats.to_str().expect("utf-8 path"),
            ],
        );
        let lab = &mut self.lab;
        wait_for(&format!("node {n} to start"), 20, || {
            assert!(lab.running(p), "node {n} exited:\n{}", lab.log(p));
            stats.exists()
        });
        if self.io == Io::Tap {
            ip(&format!("-n {ns} link set mpup netns {}", self.fab));
            ip(&format!("-n {} link set mpup name u{n}", self.fab));
            ip(&format!("-n {} link set u{n} master br0 up", self.fab));
            ip(&format!("-n {ns} link set tp{n} netns {task}"));
            ip(&format!("-n {task} link set tp{n} name eth0"));
            config_task(&task, n);
        }
        self.nodes.push(Node { ns, proc_: p, stats, tables, uplink });
        self.tasks.push(task);
    }

    /// Two meshplane nodes.
    fn two_nodes(tag: &str, io: Io, services: bool) -> Cluster {
        Self::two_nodes_with(tag, io, services, 1)
    }

    /// Two meshplane nodes of `workers` workers each.
    fn two_nodes_with(tag: &str, io: Io, services: bool, workers: usize) -> Cluster {
        let mut c = Cluster::fabric(tag, io);
        c.workers = workers;
        c.add_node(1, &tables(1, services, ""));
        c.add_node(2, &tables(2, services, ""));
        c
    }

    /// A client namespace on the fabric at 198.18.0.100. With TAP uplinks
    /// its transmit offloads are on (its super-frames and partial
    /// checksums reach the node through the TAP's virtio-net header); an
    /// AF_XDP uplink is a NIC, on whose wire checksums are complete.
    fn client(&mut self) -> String {
        let ns = self.lab.ns("c");
        on_fabric(&self.fab, &ns, "eth0", "c", "02:00:00:00:00:64", "198.18.0.100");
        if self.io == Io::Tap {
            in_ns_ok(&ns, &["ethtool", "-K", "eth0", "tx", "on"]);
        }
        ns
    }

    /// Node i's counters file.
    fn stats(&self, i: usize) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.nodes[i].stats).expect("reading the stats file");
        serde_json::from_str(&text).expect("the stats file is JSON")
    }

    /// A drop counter of node i (0 if absent).
    fn drops(&self, i: usize, reason: &str) -> u64 {
        self.stats(i)["workers"][0]["drops"][reason].as_u64().unwrap_or(0)
    }

    /// Stops node i with SIGTERM: it must exit cleanly and leave no XDP
    /// program behind.
    fn stop_node(&mut self, i: usize) {
        let p = self.nodes[i].proc_;
        assert!(self.lab.stop(p), "node {} did not stop cleanly:\n{}", i + 1, self.lab.log(p));
        assert!(self.lab.log(p).contains("stopped;"), "{}", self.lab.log(p));
        if self.io == Io::Afxdp {
            let out = run(&["ip", "-n", &self.nodes[i].ns, "link", "show", self.nodes[i].uplink]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains("prog/xdp"), "an XDP program is left on the uplink: {text}");
        }
    }

    /// Runs a TCP transfer of `bytes` from `from` to a sink in `to` at
    /// `addr`; the sink's answer line.
    fn tcp(&mut self, from: &str, to: &str, listen: &str, connect: &str, bytes: u64) -> String {
        self.lab.tcp(from, to, listen, connect, bytes)
    }

    /// `count` UDP datagrams echoed from a server in `to`, sent from `from`.
    fn udp(&mut self, from: &str, to: &str, listen: &str, connect: &str, count: u32) -> String {
        self.lab.udp(from, to, listen, connect, count)
    }
}

fn ping(from: &str, to: &str) {
    in_ns_ok(from, &["ping", "-c", "3", "-i", "0.2", "-W", "2", to]);
}

/// Two nodes, one task each: ping, a TCP transfer each way checked byte for
/// byte, UDP.
fn overlay(io: Io) {
    let _g = serial();
    let mut c = Cluster::two_nodes(&format!("ov-{}", io.arg()), io, false);
    let (t1, t2) = (c.tasks[0].clone(), c.tasks[1].clone());
    ping(&t1, "198.19.0.2");
    ping(&t2, "198.19.0.1");
    let a = c.tcp(&t1, &t2, "198.19.0.2:5001", "198.19.0.2:5001", 4_000_000);
    assert!(a.starts_with("peer=198.19.0.1:") && a.ends_with("bytes=4000000 ok"), "{a}");
    let b = c.tcp(&t2, &t1, "198.19.0.1:5001", "198.19.0.1:5001", 3_000_000);
    assert!(b.starts_with("peer=198.19.0.2:") && b.ends_with("bytes=3000000 ok"), "{b}");
    let u = c.udp(&t1, &t2, "198.19.0.2:5002", "198.19.0.2:5002", 200);
    assert!(u.starts_with("udp: 200/200"), "{u}");
    // The nodes counted what went through them (the counters file is
    // rewritten every half second).
    // With TAP the task's kernel hands over super-frames (TSO): 4 MB in
    // far fewer frames than 1450-byte ones would take, cut into segments
    // by the uplink only if its kernel lacks the UDP-tunnel offload.
    wait_for("node 1's counters", 5, || {
        let s = c.stats(0);
        let w = &s["workers"][0];
        let (up, task) = (&w["ports"][0], &w["ports"][1]);
        let task_bytes = w["traffic"][1]["rx_bytes"].as_u64().unwrap_or(0);
        let task_frames = task["rx"].as_u64().unwrap_or(0);
        match io {
            Io::Afxdp => up["rx"].as_u64() > Some(1000) && task_frames > 1000,
            Io::Tap => task_bytes > 4_000_000 && task_frames > 10 && task_bytes / task_frames > 4000,
        }
    });
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(overlay: overlay_afxdp, overlay_tap);

/// 100 MB each way across the overlay and 100 MB through the routing mesh
/// in both modes, checked byte for byte, with the tasks' and (TAP) the
/// client's transmit offloads on. Prints the rates (the debug build; a
/// check that long streams hold, not a benchmark: `scripts/bench`
/// measures). With TAP uplinks on a kernel with the UDP-tunnel offload,
/// the super-frames cross the underlay whole: no segment is cut in
/// software.
fn big_transfers(io: Io) {
    let _g = serial();
    let mut c = Cluster::two_nodes(&format!("bt-{}", io.arg()), io, true);
    let client = c.client();
    let (t1, t2) = (c.tasks[0].clone(), c.tasks[1].clone());
    const BYTES: u64 = 100_000_000;
    #[rustfmt::skip]
    let cases = [
        (&t1, &t2, "198.19.0.2:5001", "198.19.0.2:5001", "198.19.0.1:", "overlay 1 -> 2"),
        (&t2, &t1, "198.19.0.1:5001", "198.19.0.1:5001", "198.19.0.2:", "overlay 2 -> 1"),
        (&client, &t2, "198.19.0.2:5001", "198.18.0.1:30080", "198.19.0.250:", "mesh nat"),
        (&client, &t2, "198.19.0.2:5001", "198.18.0.1:30081", "198.18.0.100:", "mesh preserve-source"),
    ];
    for (from, to, listen, connect, peer, what) in cases {
        let t0 = std::time::Instant::now();
        let a = c.tcp(from, to, listen, connect, BYTES);
        let secs = t0.elapsed().as_secs_f64();
        assert!(a.starts_with(&format!("peer={peer}")) && a.ends_with(&format!("bytes={BYTES} ok")), "{what}: {a}");
        eprintln!("{} {what}: 100 MB in {secs:.2} s ({:.2} Gbit/s)", io.arg(), BYTES as f64 * 8.0 / secs / 1e9);
    }
    if io == Io::Tap && !c.lab.log(c.nodes[0].proc_).contains("refuses VXLAN super-frames") {
        wait_for("the counters", 5, || c.stats(0)["workers"][0]["ports"][0]["tx"].as_u64() > Some(0));
        for i in 0..2 {
            let up = &c.stats(i)["workers"][0]["ports"][0];
            assert_eq!(up["tx_segmented"].as_u64(), Some(0), "node {}: uplink cut super-frames: {up}", i + 1);
            assert!(
                up["tx"].as_u64() < Some(BYTES / 1400 / 4),
                "node {}: super-frames crossed the underlay: {up}",
                i + 1
            );
        }
    }
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(big_transfers: big_transfers_afxdp, big_transfers_tap);

/// Node 1 is meshplane; node 2 is the Linux kernel's own VXLAN device
/// (vx0 is task 2's address). ARP crosses the overlay both ways (the
/// kernel's broadcast requests are answered by meshplane from state), then
/// ping and TCP both ways.
fn interop(io: Io) {
    let _g = serial();
    let mut c = Cluster::fabric(&format!("ko-{}", io.arg()), io);
    c.add_node(1, &tables(1, false, ""));
    let t1 = c.tasks[0].clone();
    let k2 = c.lab.ns("k2");
    on_fabric(&c.fab, &k2, "up0", "k2", "02:00:00:00:00:02", "198.18.0.2");
    ip(&format!("-n {k2} link add vx0 type vxlan id 4096 local 198.18.0.2 dev up0 dstport 4789 nolearning"));
    ip(&format!("-n {k2} link set vx0 address 02:00:00:00:01:02 mtu 1450 up"));
    ip(&format!("-n {k2} addr add 198.19.0.2/24 dev vx0"));
    in_ns_ok(&k2, &["ethtool", "-K", "vx0", "tx", "off"]);
    // Flooded frames (ARP) and task 1's MAC go to node 1.
    in_ns_ok(&k2, &["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", "198.18.0.1"]);
    in_ns_ok(&k2, &["bridge", "fdb", "append", "02:00:00:00:01:01", "dev", "vx0", "dst", "198.18.0.1"]);
    // The kernel resolves task 1 over the overlay: meshplane answers.
    ping(&k2, "198.19.0.1");
    let neigh = in_ns_ok(&k2, &["ip", "neigh", "show", "198.19.0.1", "dev", "vx0"]);
    assert!(neigh.contains("lladdr 02:00:00:00:01:01"), "the kernel learned task 1's MAC over the overlay: {neigh}");
    ping(&t1, "198.19.0.2");
    let a = c.tcp(&t1, &k2, "198.19.0.2:5001", "198.19.0.2:5001", 2_000_000);
    assert!(a.ends_with("bytes=2000000 ok"), "{a}");
    let b = c.tcp(&k2, &t1, "198.19.0.1:5001", "198.19.0.1:5001", 2_000_000);
    assert!(b.ends_with("bytes=2000000 ok"), "{b}");
    // The kernel's segments (its VXLAN device cuts them) reach task 1's
    // TAP coalesced into super-frames (GRO), and the stream is intact.
    if io == Io::Tap {
        wait_for("node 1 to count segments coalesced for task 1", 5, || {
            c.stats(0)["workers"][0]["ports"][1]["tx_coalesced"].as_u64() > Some(100)
        });
    }
    c.stop_node(0);
}

both_backends!(interop: interop_kernel_vxlan_afxdp, interop_kernel_vxlan_tap);

/// The routing mesh: a client connects to node 1's published ports, the
/// task on node 2 serves; in `nat` mode the task sees node 1's address in
/// the network, in `preserve-source` mode the client's.
fn mesh(io: Io) {
    let _g = serial();
    let mut c = Cluster::two_nodes(&format!("rm-{}", io.arg()), io, true);
    let client = c.client();
    let t2 = c.tasks[1].clone();
    let nat = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30080", 1_000_000);
    assert!(nat.starts_with("peer=198.19.0.250:") && nat.ends_with("bytes=1000000 ok"), "nat mode: {nat}");
    let ps = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30081", 1_000_000);
    assert!(ps.starts_with("peer=198.18.0.100:") && ps.ends_with("bytes=1000000 ok"), "preserve-source: {ps}");
    if io == Io::Afxdp {
        // The steering program leaves the rest of the uplink's traffic to
        // the kernel, which holds the data address: it answers ping, and a
        // TCP service of its own (as SSH would be) works beside the mesh.
        ping(&client, "198.18.0.1");
        let n1 = c.nodes[0].ns.clone();
        let own = c.tcp(&client, &n1, "198.18.0.1:22", "198.18.0.1:22", 200_000);
        assert!(own.starts_with("peer=198.18.0.100:") && own.ends_with(" ok"), "the kernel's own service: {own}");
    }
    // Node 2 serves its own published port too (the task is local there).
    let local = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.2:30081", 500_000);
    assert!(local.starts_with("peer=198.18.0.100:"), "{local}");
    // (The counters file is rewritten every half second.)
    wait_for("node 1 to count the connections", 5, || c.stats(0)["workers"][0]["new_connections"].as_u64() >= Some(2));
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(mesh: routing_mesh_afxdp, routing_mesh_tap);

/// One VXLAN frame from node 2 to node 1 carrying `inner`, with the VXLAN
/// flags `flags` and VNI `vni`.
fn vxlan(vni: u32, flags: u8, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![flags, 0, 0, 0];
    payload.extend_from_slice(&vni.to_be_bytes()[1..]);
    payload.push(0);
    payload.extend_from_slice(inner);
    let mut f = Vec::new();
    // From a MAC of its own (the bridge would otherwise learn node 2's
    // MAC on the injector's port and send node 2's traffic there).
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x99], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
        .udp(50000, 4789)
        .write(&mut f, &payload)
        .expect("building a frame");
    f
}

/// Malformed frames at node 1's uplink while good traffic flows: the good
/// traffic is unharmed and each kind is counted under its reason.
fn bad_input(io: Io) {
    let _g = serial();
    let mut c = Cluster::two_nodes(&format!("bad-{}", io.arg()), io, false);
    let (t1, t2) = (c.tasks[0].clone(), c.tasks[1].clone());
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1])
        .ipv4([198, 19, 0, 2], [198, 19, 0, 1], 64)
        .udp(1, 2)
        .write(&mut inner, b"bad")
        .expect("inner frame");
    let good = vxlan(4096, 0x08, &inner);
    let truncated = vxlan(4096, 0x08, &[])[..14 + 20 + 8 + 4].to_vec();
    let mut truncated = truncated;
    // Lengths that say what is there: IPv4 total 32, UDP 12.
    truncated[16..18].copy_from_slice(&32u16.to_be_bytes());
    truncated[38..40].copy_from_slice(&12u16.to_be_bytes());
    fix_ip_checksum(&mut truncated);
    let no_i = vxlan(4096, 0x00, &inner);
    let unknown_vni = vxlan(999, 0x08, &inner);
    let mut bad_csum = good.clone();
    bad_csum[24] ^= 0xff;
    let mut fragment = good.clone();
    fragment[20] = 0x20; // MF
    fix_ip_checksum(&mut fragment);
    let frames = [truncated, no_i, unknown_vni, bad_csum, fragment];
    let pcap = c.lab.dir.join("bad.pcap");
    {
        let f = std::fs::File::create(&pcap).expect("pcap");
        let mut w = meshplane_dataplane::pcap::Writer::new(std::io::BufWriter::new(f)).expect("pcap");
        for fr in &frames {
            w.write(0, 0, fr).expect("pcap");
        }
    }
    ip(&format!("-n {} tuntap add dev inj mode tap", c.fab));
    ip(&format!("-n {} link set inj master br0 up", c.fab));
    const REPEAT: u64 = 300;
    let inj = c.lab.spawn(
        &c.fab.clone(),
        "inject",
        &[
            BIN,
            "tool",
            "inject",
            "--tap",
            "inj",
            "--pcap",
            pcap.to_str().expect("utf-8"),
            "--repeat",
            &REPEAT.to_string(),
            "--pps",
            "1000",
        ],
    );
    // Good traffic meanwhile (the injection takes about 1.5 s).
    let u = c.udp(&t1, &t2, "198.19.0.2:5002", "198.19.0.2:5002", 300);
    assert!(u.starts_with("udp: 300/300"), "{u}");
    let lab = &mut c.lab;
    wait_for("the injection to end", 20, || !lab.running(inj));
    assert!(c.lab.log(inj).contains(&format!("{} frames sent", REPEAT * 5)), "{}", c.lab.log(inj));
    // The counters are written every half second.
    let reasons = ["vxlan_malformed", "vxlan_no_i_flag", "unknown_vni", "vxlan_bad_checksum", "vxlan_fragment"];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !reasons.iter().all(|r| c.drops(0, r) >= REPEAT) {
        assert!(std::time::Instant::now() < deadline, "drop counters: {}", c.stats(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in reasons {
        assert_eq!(c.drops(0, r), REPEAT, "{r}: {}", c.stats(0));
    }
    c.stop_node(0);
    c.stop_node(1);
}

fn fix_ip_checksum(f: &mut [u8]) {
    f[24..26].fill(0);
    let c = meshplane_dataplane::wire::checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

both_backends!(bad_input: bad_input_afxdp, bad_input_tap);

/// SIGHUP reloads the tables while a flow through a VIP runs: not one
/// datagram is lost, and the new tables are in use.
#[test]
fn reload_keeps_established_flows() {
    need_root!();
    let _g = serial();
    let mut c = Cluster::two_nodes("hup", Io::Afxdp, true);
    let (t1, t2) = (c.tasks[0].clone(), c.tasks[1].clone());
    let echo = c.lab.spawn(&t2, "udp-echo", &[BIN, "tool", "udp-echo", "--listen", "198.19.0.2:5002", "--idle", "30"]);
    let lab = &mut c.lab;
    wait_for("the echo server", 10, || {
        assert!(lab.running(echo));
        String::from_utf8_lossy(&in_ns(&t2, &["ss", "-lun"]).stdout).contains(":5002 ")
    });
    // Datagrams through the VIP one after the other (a few seconds),
    // reloading 5 times meanwhile with tables that differ (an extra
    // endpoint each time).
    let pinger =
        c.lab.spawn(&t1, "udp-ping", &[BIN, "tool", "udp-ping", "--connect", "198.19.0.100:7", "--count", "5000"]);
    for k in 0..5u8 {
        std::thread::sleep(Duration::from_millis(100));
        let extra = format!(
            "[[endpoint]]\nnetwork = \"app\"\nip = \"198.19.0.{}\"\nmac = \"02:00:00:00:01:{:02x}\"\nvtep = \"198.18.0.2\"\n",
            10 + k,
            0x10 + k
        );
        std::fs::write(&c.nodes[0].tables, tables(1, true, &extra)).expect("tables");
        c.lab.signal(c.nodes[0].proc_, "HUP");
    }
    let lab = &mut c.lab;
    assert!(lab.running(pinger), "the flow outlasts the reloads (make it longer)");
    wait_for("the pings", 60, || !lab.running(pinger));
    let out = c.lab.log(pinger);
    assert!(out.contains("udp: 5000/5000"), "{out}");
    let p = c.nodes[0].proc_;
    let lab = &c.lab;
    wait_for("five reloads", 5, || lab.log(p).matches("tables reloaded").count() == 5);
    wait_for("version 6", 5, || c.stats(0)["tables_version"].as_u64() == Some(6));
    // A port published by a reload works at once: the XDP steering
    // program learned it.
    let client = c.client();
    let web2 = "[[service]]\nname = \"web2\"\nprotocol = \"tcp\"\nnetwork = \"app\"\ntarget_port = 5001\npublished = [{ port = 30090, mode = \"nat\" }]\n[[service.backend]]\nip = \"198.19.0.2\"\n";
    std::fs::write(&c.nodes[0].tables, tables(1, true, web2)).expect("tables");
    c.lab.signal(c.nodes[0].proc_, "HUP");
    wait_for("version 7", 5, || c.stats(0)["tables_version"].as_u64() == Some(7));
    let out = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30090", 100_000);
    assert!(out.starts_with("peer=198.19.0.250:") && out.ends_with(" ok"), "{out}");
    // A broken file is refused and the node keeps going.
    std::fs::write(&c.nodes[0].tables, "not toml [").expect("tables");
    c.lab.signal(c.nodes[0].proc_, "HUP");
    let p = c.nodes[0].proc_;
    let lab = &c.lab;
    wait_for("the refusal", 5, || lab.log(p).contains("keeping the old tables"));
    ping(&t1, "198.19.0.2");
    c.stop_node(0);
    c.stop_node(1);
}

/// CPU time (user + system, seconds) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    let hz: f64 = String::from_utf8_lossy(&run(&["getconf", "CLK_TCK"]).stdout).trim().parse().unwrap_or(100.0);
    ticks / hz
}

/// The nice value of each thread of process `pid`, by thread name.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc/PID/task").flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        // Field 19 (nice) is the 17th after the name's closing parenthesis.
        let nice = stat[close + 2..].split_whitespace().nth(16).and_then(|n| n.parse().ok());
        out.push((stat[open + 1..close].to_owned(), nice.expect("stat's nice field")));
    }
    out
}

/// After frames a worker spins for the next one (`--spin-us`, yielding its
/// core), then sleeps: an idle node (no --busy-poll) uses under 5% of a
/// core, and a worker that slept has its counters current. Its worker runs
/// at the default `--worker-nice` (-10), its other threads at 0.
#[test]
fn idle_node_sleeps() {
    need_root!();
    let _g = serial();
    let c = Cluster::two_nodes("idle", Io::Afxdp, false);
    let nices = thread_nices(c.lab.procs[c.nodes[0].proc_].child.id());
    let workers: Vec<i64> = nices.iter().filter(|(n, _)| n.starts_with("mp-worker")).map(|&(_, v)| v).collect();
    assert_eq!(workers, [-10], "one worker, at nice -10: {nices:?}");
    assert!(nices.iter().any(|(n, v)| !n.starts_with("mp-worker") && *v == 0), "the other threads at 0: {nices:?}");
    let worker = |key: &str| c.stats(0)["workers"][0][key].as_u64().unwrap_or(0);
    ping(&c.tasks[0], "198.19.0.2");
    wait_for("the spin after the pings", 5, || worker("spin_yields") > 0);
    std::thread::sleep(Duration::from_millis(500));
    let pid = c.lab.procs[c.nodes[0].proc_].child.id();
    let (before, waits, yields) = (cpu_seconds(pid), worker("idle_waits"), worker("spin_yields"));
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.05 * 3.0, "an idle node used {used:.3} s of CPU in 3 s");
    assert!(worker("idle_waits") > waits, "the idle worker slept");
    assert!(
        worker("spin_yields") - yields < 100_000,
        "no spinning without frames (a spinner yields ~10^6 times a second)"
    );
    eprintln!("idle node: {:.1}% of a core; spin yields after 3 pings {yields}", used / 3.0 * 100.0);
}

/// Two workers per node (devices with two queues): overlay and routing-mesh
/// connections all work, whichever worker receives their frames (worker 0
/// owns the connection state; the other hands it what touches it).
fn two_workers(io: Io) {
    let _g = serial();
    let mut c = Cluster::two_nodes_with(&format!("mw-{}", io.arg()), io, true, 2);
    let client = c.client();
    let (t1, t2) = (c.tasks[0].clone(), c.tasks[1].clone());
    for k in 0..4 {
        let a = c.tcp(&t1, &t2, "198.19.0.2:5001", "198.19.0.2:5001", 300_000);
        assert!(a.ends_with("bytes=300000 ok"), "overlay {k}: {a}");
        let m = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30080", 300_000);
        assert!(m.starts_with("peer=198.19.0.250:") && m.ends_with(" ok"), "mesh {k}: {m}");
        let p = c.tcp(&client, &t2, "198.19.0.2:5001", "198.18.0.1:30081", 300_000);
        assert!(p.starts_with("peer=198.18.0.100:") && p.ends_with(" ok"), "preserve-source {k}: {p}");
    }
    let u = c.udp(&t1, &t2, "198.19.0.2:5002", "198.19.0.100:7", 200);
    assert!(u.starts_with("udp: 200/200"), "VIP: {u}");
    wait_for("two workers' counters", 5, || c.stats(0)["workers"].as_array().is_some_and(|w| w.len() == 2));
    let s = c.stats(0);
    eprintln!(
        "node 1: worker 1 handed {} frames to worker 0; busy rounds {} / {}",
        s["workers"][1]["handed_off"], s["workers"][0]["busy_rounds"], s["workers"][1]["busy_rounds"]
    );
    assert_eq!(s["workers"][1]["new_connections"].as_u64(), Some(0), "only worker 0 tracks connections: {s}");
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(two_workers: two_workers_afxdp, two_workers_tap);

/// `meshplane pktgen` over a plain veth pair, every profile: what is sent
/// arrives, counted and timed by the receive side; bad arguments are
/// refused with a message.
#[test]
fn pktgen_profiles() {
    need_root!();
    let _g = serial();
    let mut lab = Lab::new("pg");
    let ns = lab.ns("gen");
    ip(&format!("-n {ns} link add ga type veth peer name gb"));
    ip(&format!("-n {ns} link set ga up"));
    ip(&format!("-n {ns} link set gb up"));
    let base = [
        BIN,
        "pktgen",
        "--iface",
        "ga",
        "--rx",
        "gb",
        "--src-mac",
        "02:00:00:00:00:64",
        "--dst-mac",
        "02:00:00:00:00:01",
        "--src-ip",
        "198.18.0.100",
        "--dst-ip",
        "198.18.0.1",
        "--count",
        "3000",
        "--rate",
        "30000",
        "--duration",
        "5",
        "--json",
    ];
    for extra in [
        &["--profile", "udp", "--flows", "100"][..],
        &["--profile", "udp", "--size", "0"][..],
        &["--profile", "syn"][..],
        &["--profile", "vxlan", "--size", "150", "--flows", "10"][..],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = in_ns_ok(&ns, &args);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!((v["sent"].as_u64(), v["received"].as_u64()), (Some(3000), Some(3000)), "{extra:?}: {v}");
        assert!(v["latency_us_p99"].as_f64().is_some(), "{extra:?}: {v}");
        // About 30 000 frames a second: the rate cap holds.
        let secs = v["seconds"].as_f64().unwrap_or(0.0);
        assert!(secs > 0.08, "{extra:?}: 3000 frames at 30 000/s took {secs} s");
    }
    let bad = in_ns(
        &ns,
        &[
            BIN,
            "pktgen",
            "--iface",
            "ga",
            "--src-mac",
            "02:00:00:00:00:64",
            "--dst-mac",
            "02:00:00:00:00:01",
            "--src-ip",
            "198.18.0.100",
            "--dst-ip",
            "198.18.0.1",
            "--size",
            "20",
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--size must be 60 to 1514"), "{bad:?}");
}

/// `meshplane lab up`, `demo` and `down`: the README's first command, with
/// both I/O backends. The demo fails (non-zero) unless every request is
/// answered, every task answers, and preserve-source tasks see the client.
#[test]
fn lab_demo_runs_to_the_end() {
    need_root!();
    let _g = serial();
    for io in ["afxdp", "tap"] {
        let dir = std::env::temp_dir().join(format!("meshplane-e2e-lab-{}-{io}", std::process::id()));
        let lab = |args: &[&str]| {
            let mut v = vec!["lab"];
            v.extend_from_slice(args);
            v.extend_from_slice(&["--dir", dir.to_str().expect("utf-8")]);
            std::process::Command::new(BIN).args(&v).output().expect("running meshplane lab")
        };
        // Whatever an earlier run left.
        let _ = lab(&["down"]);
        let up = lab(&["up", "--io", io]);
        let demo = if up.status.success() { Some(lab(&["demo", "--requests", "2"])) } else { None };
        let down = lab(&["down"]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            up.status.success(),
            "{io}: lab up: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        let demo = demo.expect("ran");
        let text = String::from_utf8_lossy(&demo.stdout);
        assert!(demo.status.success(), "{io}: lab demo:\n{text}{}", String::from_utf8_lossy(&demo.stderr));
        assert!(text.contains("12 of 12 requests answered; 3 of 3 tasks answered"), "{text}");
        assert!(text.contains("every task saw the client's own address"), "{text}");
        assert!(text.contains("every task reached api by its name"), "{text}");
        assert!(down.status.success());
        let left = String::from_utf8_lossy(&run(&["ip", "netns", "list"]).stdout).into_owned();
        assert!(!left.contains("mp-lab-"), "lab down left namespaces: {left}");
    }
}

/// `meshplane lab up --podman`, `demo` and `down` (`scripts/demo
/// --podman`): web.1..3 are podman containers attached by the CNI plugin,
/// the demo's summary holds for them (by name and egress run inside the
/// containers), `task ls` shows their containers, `lab status` shows them,
/// and `lab down` leaves no container, no container process, no podman
/// namespace, no mount, no `mp-lab-` namespace and nothing of podman's in
/// the lab's directory.
#[test]
fn lab_demo_runs_with_podman() {
    need_root!();
    let lacking: Vec<&str> = ["podman", "runc", "conmon"]
        .into_iter()
        .filter(|p| {
            let o = std::process::Command::new("sh").args(["-c", &format!("command -v {p}")]).output();
            !o.is_ok_and(|o| o.status.success())
        })
        .collect();
    if !lacking.is_empty() {
        eprintln!("skipped: {} not installed (scripts/bootstrap installs them)", lacking.join(", "));
        return;
    }
    let plugin = std::path::Path::new(BIN).with_file_name("meshplane-cni");
    if !plugin.exists() || !std::path::Path::new("/bin/busybox").exists() {
        eprintln!("skipped: {} or /bin/busybox (busybox-static) missing", plugin.display());
        return;
    }
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("meshplane-e2e-lab-{}-podman", std::process::id()));
    let d = dir.to_str().expect("utf-8").to_owned();
    let lab = |args: &[&str]| {
        let mut v = vec!["lab"];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--dir", &d]);
        std::process::Command::new(BIN).args(&v).output().expect("running meshplane lab")
    };
    let out = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let podman = |args: &[&str]| {
        std::process::Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", dir.join("podman/containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", dir.join("podman/storage.conf"))
            .output()
            .expect("running podman")
    };
    let _ = lab(&["down"]);
    let up = lab(&["up", "--podman"]);
    // What must hold while it runs, gathered before `down` (which runs
    // whatever happened).
    let mut seen = Vec::new();
    let (demo, status, tasks_json, tasks_table) = if up.status.success() {
        for n in 1..=3 {
            let name = format!("mp-lab-web-{n}");
            let f = "{{.Id}} {{.State.Pid}} {{.NetworkSettings.SandboxKey}}";
            let o = podman(&["inspect", "-f", f, &name]);
            // Checked after `down`, which must run whatever happens.
            let v: Vec<String> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect();
            seen.push((name, v, out(&o)));
        }
        let node1 = dir.join("node1");
        let task_ls = |fmt: &[&str]| {
            let mut c = std::process::Command::new(BIN);
            c.args(["task", "ls"]).args(fmt).arg("--state-dir").arg(&node1);
            String::from_utf8_lossy(&c.output().expect("task ls").stdout).into_owned()
        };
        (Some(lab(&["demo", "--requests", "2"])), Some(lab(&["status"])), task_ls(&["--format", "json"]), task_ls(&[]))
    } else {
        (None, None, String::new(), String::new())
    };
    let down = lab(&["down"]);
    let podman_dir_left = dir.join("podman").exists();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts_left: Vec<&str> =
        mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(d.as_str())).collect();
    let needle = format!("{d}/podman/");
    let procs_left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|p| {
            let cmdline = String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).ok()?).replace('\0', " ");
            cmdline.contains(&needle).then(|| format!("{}: {cmdline}", p.file_name().to_string_lossy()))
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(up.status.success(), "lab up --podman: {}", out(&up));
    let demo = demo.expect("ran");
    let text = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "lab demo:\n{}", out(&demo));
    assert!(text.contains("12 of 12 requests answered; 3 of 3 tasks answered"), "{text}");
    assert!(text.contains("every task saw the client's own address"), "{text}");
    assert!(text.contains("every task reached the outside from its node's address"), "{text}");
    assert!(text.contains("every task reached api by its name"), "{text}");
    let seen: Vec<(String, String, String, String)> = seen
        .into_iter()
        .map(|(name, v, o)| {
            assert_eq!(v.len(), 3, "podman inspect {name}: {o}");
            (name, v[0].clone(), v[1].clone(), v[2].clone())
        })
        .collect();
    // web.1..3 are the containers, each on its node.
    let tasks: serde_json::Value = serde_json::from_str(&tasks_json).expect("task ls json");
    for (i, (name, id, _, _)) in seen.iter().enumerate() {
        let n = i + 1;
        let t = tasks
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["id"] == format!("web.{n}"))
            .unwrap_or_else(|| panic!("no web.{n}: {tasks_json}"));
        assert_eq!(t["container"]["id"], id.as_str(), "{t}");
        assert_eq!(t["container"]["name"], name.as_str(), "{t}");
        assert_eq!(t["node"], format!("node{n}"), "{t}");
        let row = tasks_table.lines().find(|l| l.starts_with(&format!("web.{n} "))).expect("a row");
        assert!(row.contains(id.get(..12).unwrap_or(id)), "task ls shows web.{n}'s container: {row}\n{tasks_table}");
    }
    let status = status.expect("ran");
    let st = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && st.contains("web.1 podman container mp-lab-web-1"),
        "lab status: {}",
        out(&status)
    );
    // Nothing left.
    assert!(down.status.success(), "lab down: {}", out(&down));
    assert!(String::from_utf8_lossy(&down.stdout).contains("3 podman containers removed"), "{}", out(&down));
    for (name, _, pid, sandbox) in &seen {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains("httpd"), "{name}'s process {pid} still runs");
        assert!(!std::path::Path::new(sandbox).exists(), "{name}'s namespace {sandbox} is still there");
    }
    assert!(!podman_dir_left, "lab down left {d}/podman");
    assert!(mounts_left.is_empty(), "lab down left mounts: {mounts_left:?}");
    assert!(procs_left.is_empty(), "processes left: {procs_left:?}");
    let left = String::from_utf8_lossy(&run(&["ip", "netns", "list"]).stdout).into_owned();
    assert!(!left.contains("mp-lab-"), "lab down left namespaces: {left}");
}

/// The control plane and the CLI end to end on the lab (see
/// `cluster.rs`), with both I/O backends.
fn cluster_cli(io: Io) {
    let _g = serial();
    cluster::cluster_on_the_lab(if io == Io::Tap { "tap" } else { "afxdp" });
}
both_backends!(cluster_cli: cluster_cli_afxdp, cluster_cli_tap);

mod discovery;
mod egress;
mod flood;
mod mesh_icmp;
mod routed;

/// The underlay MTU and the data-path port (see `mtu.rs`).
fn mtu_refused(io: Io) {
    let _g = serial();
    mtu::mtu_refused_on_a_small_underlay(io);
}
both_backends!(mtu_refused: mtu_refused_afxdp, mtu_refused_tap);

fn jumbo(io: Io) {
    let _g = serial();
    mtu::jumbo_underlay(io);
}
both_backends!(jumbo: jumbo_underlay_afxdp, jumbo_underlay_tap);

fn dp_port(io: Io) {
    let _g = serial();
    mtu::data_path_port(io);
}
both_backends!(dp_port: data_path_port_afxdp, data_path_port_tap);

mod health;

/// Health checks on the lab (see `health.rs`), with both I/O backends.
fn health_checks(io: Io) {
    let _g = serial();
    health::health_on_the_lab(io.arg());
}
both_backends!(health_checks: health_checks_afxdp, health_checks_tap);
