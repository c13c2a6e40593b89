//! The worker loop over in-memory ports: frames in, the pipeline's exact
//! frames out on the right ports, counters published, tables swapped
//! between bursts, stop honoured. (Real ports: tests/e2e.rs.)

use meshplane_dataplane::io::mem::{MemPort, MemQueues};
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process};
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::worker::{Bound, Shared, Worker, WorkerConfig};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const M1: [u8; 6] = [2, 0, 0, 0, 1, 1];
const M2: [u8; 6] = [2, 0, 0, 0, 1, 2];
const M3: [u8; 6] = [2, 0, 0, 0, 1, 3];

fn tables() -> Tables {
    Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml")).unwrap()
}

fn udp(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], sport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst).ipv4(sip, dip, 64).udp(sport, 5001).write(&mut f, b"hello").unwrap();
    f
}

/// `inner` in VXLAN (VNI 4096) from node 2 to node 1.
fn vxlan_in(inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0, 0x10, 0x00, 0];
    payload.extend_from_slice(inner);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
        .udp(51000, 4789)
        .write(&mut f, &payload)
        .unwrap();
    f
}

/// What the pipeline alone makes of `input` on `in_port`.
fn expected(t: &Tables, in_port: u16, input: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + 2048];
    buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let mut f = Frame::new(&mut buf, HEADROOM, input.len()).unwrap();
    let mut st = WorkerState::for_tables(t);
    let v = process(&mut f, in_port, 1, t, &mut st);
    (v, f.data().to_vec())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Rig {
    shared: Arc<Shared>,
    q: Vec<Arc<Mutex<MemQueues>>>,
    handle: Option<std::thread::JoinHandle<meshplane_dataplane::worker::Report>>,
}

impl Rig {
    fn start(names: &[&str], cfg: WorkerConfig) -> Rig {
        let shared = Shared::new(tables(), 1);
        let mut ports: Vec<Bound> = Vec::new();
        let mut q = Vec::new();
        for n in names {
            let (p, h) = MemPort::new(n);
            ports.push(Bound::new(n, Box::new(p)));
            q.push(h);
        }
        let w = Worker::new(0, ports, shared.clone(), cfg).unwrap();
        let handle = Some(std::thread::spawn(move || w.run().unwrap()));
        Rig { shared, q, handle }
    }
    fn push(&self, port: usize, f: Vec<u8>) {
        self.q[port].lock().unwrap().rx.push_back(f);
    }
    fn sent(&self, port: usize) -> Vec<Vec<u8>> {
        self.q[port].lock().unwrap().tx.clone()
    }
    fn stop(mut self) -> meshplane_dataplane::worker::Report {
        self.shared.stop();
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn frames_go_where_the_pipeline_says_with_its_bytes() {
    let t = tables();
    let rig = Rig::start(&["uplink", "task1", "task3"], WorkerConfig::default());
    // task1 → task3 (local), task1 → T2 (remote: VXLAN on the uplink).
    let local = udp(M3, M1, [198, 19, 0, 1], [198, 19, 0, 3], 1000);
    let remote = udp(M2, M1, [198, 19, 0, 1], [198, 19, 0, 2], 1001);
    rig.push(1, local.clone());
    rig.push(1, remote.clone());
    wait_for("both frames", || rig.sent(2).len() == 1 && rig.sent(0).len() == 1);
    let (v, out) = expected(&t, 1, &local);
    assert_eq!((v, rig.sent(2)[0].clone()), (Verdict::Tx(2), out));
    let (v, out) = expected(&t, 1, &remote);
    assert_eq!((v, rig.sent(0)[0].clone()), (Verdict::Tx(0), out));
    // T2's reply in VXLAN from node 2: decapsulated to task1.
    let reply = udp(M1, M2, [198, 19, 0, 2], [198, 19, 0, 1], 5001);
    let back = vxlan_in(&reply);
    let (bv, inner) = expected(&t, 0, &back);
    assert_eq!(bv, Verdict::Tx(1));
    rig.push(0, back);
    wait_for("the decapsulated frame", || rig.sent(1).len() == 1);
    assert_eq!(rig.sent(1)[0], inner);
    assert_eq!(inner, reply, "decap gives back node 2's inner frame");
    let r = rig.stop();
    let st = r.stats.unwrap();
    assert_eq!((st.ports[1].rx_packets, st.ports[0].tx_packets, st.ports[2].tx_packets), (2, 1, 1));
    assert_eq!((st.ports[0].rx_packets, st.ports[1].tx_packets), (1, 1));
    assert_eq!(
        r.io.iter().map(|(n, s)| (n.as_str(), s.rx, s.tx)).collect::<Vec<_>>(),
        [("uplink", 1, 1), ("task1", 2, 1), ("task3", 0, 1)]
    );
}

#[test]
fn a_port_without_io_counts_unbound_and_bad_frames_count_drops() {
    // db1 is in the tables but has no I/O port here.
    let rig = Rig::start(&["uplink", "task1"], WorkerConfig::default());
    let to_task3 = udp(M3, M1, [198, 19, 0, 1], [198, 19, 0, 3], 1000);
    rig.push(1, to_task3);
    rig.push(1, vec![0u8; 5]); // shorter than an Ethernet header
    wait_for("the counters", || {
        rig.shared.report(0).is_some_and(|r| r.unbound == 1 && r.stats.is_some_and(|s| s.total_drops() == 1))
    });
    let r = rig.stop();
    let st = r.stats.as_ref().unwrap();
    assert_eq!(st.dropped(meshplane_dataplane::packet::DropReason::Malformed), 1);
    assert!(rig_sent_nothing(&r));
}

fn rig_sent_nothing(r: &meshplane_dataplane::worker::Report) -> bool {
    r.io.iter().all(|(_, s)| s.tx == 0)
}

#[test]
fn new_tables_are_used_between_bursts() {
    let rig = Rig::start(&["uplink", "task1", "task3"], WorkerConfig::default());
    let remote = udp(M2, M1, [198, 19, 0, 1], [198, 19, 0, 2], 1001);
    rig.push(1, remote.clone());
    wait_for("the first frame", || rig.sent(0).len() == 1);
    // The same tables with T2 moved to another VTEP: the next frame is
    // encapsulated toward it.
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.toml"))
        .unwrap()
        .replace(
            "vtep = \"198.18.0.2\"\n\n[[endpoint]]\nnetwork = \"db\"",
            "vtep = \"198.18.0.9\"\n\n[[endpoint]]\nnetwork = \"db\"",
        )
        .replace("ttl = 64", "next_hop_mac = \"02:00:00:00:00:fe\"\nttl = 64");
    let nt = Tables::compile(&toml::from_str(&spec).unwrap()).unwrap();
    rig.shared.publish(nt);
    wait_for("the new version", || rig.shared.report(0).is_some_and(|r| r.tables_version == 2));
    rig.push(1, remote.clone());
    wait_for("the second frame", || rig.sent(0).len() == 2);
    let sent = rig.sent(0);
    assert_eq!(&sent[0][30..34], &[198, 18, 0, 2]);
    assert_eq!(&sent[1][30..34], &[198, 18, 0, 9]);
}

#[test]
fn an_idle_worker_sleeps_and_busy_poll_does_not() {
    let cfg =
        WorkerConfig { spin: Duration::from_millis(1), max_wait: Duration::from_millis(5), ..WorkerConfig::default() };
    let rig = Rig::start(&["uplink"], cfg.clone());
    wait_for("an idle wait", || rig.shared.report(0).is_some_and(|r| r.idle_waits > 2));
    drop(rig);
    let rig = Rig::start(&["uplink"], WorkerConfig { busy_poll: true, report_every: Duration::from_millis(1), ..cfg });
    std::thread::sleep(Duration::from_millis(50));
    let r = rig.stop();
    assert_eq!(r.idle_waits, 0);
}

#[test]
fn unknown_and_duplicate_port_names_are_refused() {
    let shared = Shared::new(tables(), 1);
    let (a, _) = MemPort::new("x");
    let e =
        Worker::new(0, vec![Bound::new("nosuch", Box::new(a))], shared.clone(), WorkerConfig::default()).unwrap_err();
    assert!(e.to_string().contains("\"nosuch\" is not in the tables"), "{e}");
    let (a, _) = MemPort::new("a");
    let (b, _) = MemPort::new("b");
    let ports = vec![Bound::new("task1", Box::new(a)), Bound::new("task1", Box::new(b))];
    let e = Worker::new(0, ports, shared, WorkerConfig::default()).unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
}

/// Two workers on the tables of `examples/tables-lb.toml`, each with its
/// own memory ports of these names.
struct TwoWorkers {
    t: Tables,
    shared: Arc<Shared>,
    /// By worker, then by port: the port's queues.
    queues: Vec<Vec<Arc<Mutex<MemQueues>>>>,
    handles: Vec<std::thread::JoinHandle<meshplane_dataplane::worker::Report>>,
}

impl TwoWorkers {
    fn start(names: &[&str]) -> TwoWorkers {
        let lb = || Tables::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables-lb.toml")).unwrap();
        let shared = Shared::new(lb(), 2);
        let (mut queues, mut handles) = (Vec::new(), Vec::new());
        for w in 0..2 {
            let mut ports = Vec::new();
            let mut q = Vec::new();
            for n in names {
                let (p, h) = MemPort::new(n);
                ports.push(Bound::new(n, Box::new(p)));
                q.push(h);
            }
            let worker = Worker::new(w, ports, shared.clone(), WorkerConfig::default()).unwrap();
            handles.push(std::thread::spawn(move || worker.run().unwrap()));
            queues.push(q);
        }
        TwoWorkers { t: lb(), shared, queues, handles }
    }
}

/// Two workers: frames that touch connection state (a task's connection to
/// a VIP) reach worker 0 whichever worker received them, so both
/// directions meet one connection table; plain overlay frames stay where
/// they came in.
#[test]
fn stateful_frames_are_handed_to_worker_0() {
    let TwoWorkers { t, shared, queues, handles } = TwoWorkers::start(&["uplink", "task1", "task3"]);
    let sent = |w: usize, p: usize| queues[w][p].lock().unwrap().tx.clone();
    // Task 1 → VIP 198.19.0.100:80 on worker 1's queue: rr picks T3
    // (local), and the connection is tracked by worker 0.
    let mut syn = Vec::new();
    etherparse::PacketBuilder::ethernet2(M1, [0x02, 0x42, 0xc6, 0x13, 0x00, 0xfe])
        .ipv4([198, 19, 0, 1], [198, 19, 0, 100], 64)
        .tcp(40001, 80, 1, 64000)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    queues[1][1].lock().unwrap().rx.push_back(syn.clone());
    wait_for("the balanced frame", || sent(0, 2).len() == 1);
    let mut st = WorkerState::for_tables(&t);
    let mut buf = vec![0u8; HEADROOM + 2048];
    buf[HEADROOM..HEADROOM + syn.len()].copy_from_slice(&syn);
    let mut f = Frame::new(&mut buf, HEADROOM, syn.len()).unwrap();
    assert_eq!(process(&mut f, 1, 1, &t, &mut st), Verdict::Tx(2));
    assert_eq!(sent(0, 2)[0], f.data(), "worker 0 sent exactly what the pipeline makes");
    assert!(sent(1, 2).is_empty(), "worker 1 sent nothing itself");
    // T3's reply on worker 1's queue of task3 also goes to worker 0, which
    // knows the connection and turns the source back into the VIP.
    let mut reply = Vec::new();
    etherparse::PacketBuilder::ethernet2(M3, M1)
        .ipv4([198, 19, 0, 3], [198, 19, 0, 1], 64)
        .tcp(8080, 40001, 1, 64000)
        .syn()
        .ack(2)
        .write(&mut reply, &[])
        .unwrap();
    queues[1][2].lock().unwrap().rx.push_back(reply);
    wait_for("the reply", || sent(0, 1).len() == 1);
    assert_eq!(&sent(0, 1)[0][26..30], &[198, 19, 0, 100], "the reply comes from the VIP");
    shared.stop();
    let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!((reports[1].handed_off, reports[0].handed_in, reports[1].handoff_full), (2, 2, 0));
    assert_eq!(reports[0].services[0].new_conns, 1);
    assert!(reports[1].services[0].new_conns == 0, "worker 1 tracked nothing");
}

/// VXLAN from node 2 (198.18.0.2) to this node, around `inner`.
fn vxlan_from_node2(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
        .udp(50000, 4789)
        .write(&mut f, &payload)
        .unwrap();
    f
}

/// Two workers, one burst on worker 1's uplink mixing frames that need no
/// connection state (VXLAN of network `db`, which has no services) with
/// one that does (VXLAN of `app`): worker 1 handles the runs around the
/// stateful frame itself, in order, exactly as the pipeline does frame by
/// frame, and hands the stateful one to worker 0.
#[test]
fn a_burst_is_split_around_the_frames_worker_0_takes() {
    let TwoWorkers { t, shared, queues, handles } = TwoWorkers::start(&["uplink", "task1", "task3", "db1"]);
    let sent = |w: usize, p: usize| queues[w][p].lock().unwrap().tx.clone();
    // db: 198.19.1.2 (behind node 2) -> 198.19.1.1 (db1), UDP; app:
    // 198.19.0.2 (behind node 2) -> 198.19.0.1 (task1), UDP.
    let udp = |src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16| {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, dst, 64)
            .udp(sport, 5353)
            .write(&mut f, b"payload")
            .unwrap();
        f
    };
    let db = |sport| {
        vxlan_from_node2(4097, &udp([2, 0, 0, 0, 2, 2], [2, 0, 0, 0, 2, 1], [198, 19, 1, 2], [198, 19, 1, 1], sport))
    };
    let app = vxlan_from_node2(4096, &udp(M2, M1, [198, 19, 0, 2], [198, 19, 0, 1], 7000));
    let burst = [db(1000), app.clone(), db(1001), db(1002)];
    {
        let mut q = queues[1][0].lock().unwrap();
        for f in &burst {
            q.rx.push_back(f.clone());
        }
    }
    wait_for("the db frames", || sent(1, 3).len() == 3);
    wait_for("the app frame", || sent(0, 1).len() == 1);
    let want: Vec<Vec<u8>> = [&burst[0], &burst[2], &burst[3]]
        .iter()
        .map(|f| {
            let (v, out) = expected(&t, 0, f);
            assert_eq!(v, Verdict::Tx(3));
            out
        })
        .collect();
    assert_eq!(sent(1, 3), want, "worker 1 delivered the db frames itself, in order, as the pipeline makes them");
    assert_eq!(sent(0, 1), vec![expected(&t, 0, &app).1], "worker 0 delivered the app frame");
    shared.stop();
    let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!((reports[1].handed_off, reports[0].handed_in), (1, 1));
}

/// A sleeping worker is woken by new tables (and by stop): with a 10 s
/// sleep, it still takes them at once.
#[test]
fn new_tables_wake_a_sleeping_worker() {
    let cfg =
        WorkerConfig { spin: Duration::from_millis(1), max_wait: Duration::from_secs(10), ..WorkerConfig::default() };
    let rig = Rig::start(&["uplink"], cfg);
    wait_for("the worker to sleep", || rig.shared.report(0).is_some_and(|r| r.idle_waits >= 1));
    assert_eq!(rig.shared.in_use(0), 1);
    let start = Instant::now();
    rig.shared.publish(tables());
    wait_for("version 2 in use", || rig.shared.in_use(0) == 2);
    assert!(start.elapsed() < Duration::from_secs(5), "woken, not timed out");
    let start = Instant::now();
    let _ = rig.stop();
    assert!(start.elapsed() < Duration::from_secs(5), "stop wakes it too");
}

#[test]
fn ports_come_and_go_with_the_tables() {
    // The worker starts with the uplink and task1 only; task3 is in the
    // tables but has no I/O port yet (frames to it count as unbound).
    let t = tables();
    let rig = Rig::start(&["uplink", "task1"], WorkerConfig::default());
    let to3 = udp(M3, M1, [198, 19, 0, 1], [198, 19, 0, 3], 1000);
    rig.push(1, to3.clone());
    wait_for("an unbound frame", || rig.shared.report(0).is_some_and(|r| r.unbound == 1));
    // task3 arrives: given to the worker, then the tables (the same ones)
    // published: frames reach it, and frames from it are read.
    let (p3, q3) = MemPort::new("task3");
    rig.shared.change_ports(0, vec![Bound::new("task3", Box::new(p3))], &[]);
    rig.shared.publish(tables());
    wait_for("the new version", || rig.shared.report(0).is_some_and(|r| r.tables_version == 2));
    rig.push(1, to3.clone());
    wait_for("the frame on task3", || q3.lock().unwrap().tx.len() == 1);
    assert_eq!(q3.lock().unwrap().tx[0], expected(&t, 1, &to3).1);
    let from3 = udp(M1, M3, [198, 19, 0, 3], [198, 19, 0, 1], 1000);
    q3.lock().unwrap().rx.push_back(from3.clone());
    wait_for("task3's frame on task1", || rig.sent(1).len() == 1);
    assert_eq!(rig.sent(1)[0], expected(&t, 2, &from3).1);
    // A port given before the tables name it is not read until they do.
    let (px, qx) = MemPort::new("later");
    qx.lock().unwrap().rx.push_back(from3.clone());
    rig.shared.change_ports(0, vec![Bound::new("later", Box::new(px))], &["task3".to_owned()]);
    rig.shared.publish(tables());
    wait_for("version 3", || rig.shared.report(0).is_some_and(|r| r.tables_version == 3));
    let r = rig.shared.report(0).unwrap();
    assert_eq!(r.io.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["uplink", "task1", "later"]);
    assert_eq!(qx.lock().unwrap().rx.len(), 1, "a port the tables do not name is not read");
    // task3 is gone: frames to it are unbound again.
    rig.push(1, to3);
    wait_for("a second unbound frame", || rig.shared.report(0).is_some_and(|r| r.unbound == 2));
    assert_eq!(q3.lock().unwrap().tx.len(), 1);
}
