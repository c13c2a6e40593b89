//! The embedded DNS server of a managed node, without the dataplane's
//! path to it: one node (TAP I/O, namespace `mp-ds-n`) with two networks
//! (`app`, and `priv` --internal), queries sent straight to the host
//! link's kernel end on each network's port with `meshplane tool dns-raw`
//! (as the dataplane will NAT them there), a fake upstream in the node's
//! namespace (`--dns-upstream 127.0.0.1:5353`). Checks: cluster names per
//! network, forwarding (and none from the internal network), FORMERR and
//! answers after it, TCP, `task attach`'s DNS line and the tasks'
//! resolv.conf (removed with the task), the counters in `stats`.
//! The queries through a task's gateway are the end-to-end tests of the
//! dataplane half (`dig`, `getent`, `dnsperf`).

use crate::lab::{BIN, Lab, in_ns_ok, ip, wait_for};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Removes the tasks' /etc/netns directories (also on failure).
struct Etc(Vec<String>);

impl Drop for Etc {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// A DNS query for `name` (type A, ID 0x1234, RD), hex.
fn query(name: &str) -> String {
    let mut b = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        b.push(l.len() as u8);
        b.extend_from_slice(l.as_bytes());
    }
    b.extend_from_slice(&[0, 0, 1, 0, 1]);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fake upstream on 127.0.0.1:5353 in namespace `ns` (a thread moved
/// into it): answers every query with 198.18.30.10, counting them; stops
/// with the flag or after 60 s.
fn upstream(ns: &str, seen: Arc<AtomicU32>, stop: Arc<AtomicBool>) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the node's namespace");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (this thread only)");
        let s = UdpSocket::bind("127.0.0.1:5353").expect("bind in the node's namespace");
        s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let _ = ready_tx.send(());
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
            let Ok((n, from)) = s.recv_from(&mut buf) else { continue };
            seen.fetch_add(1, Ordering::Relaxed);
            // The question: the name's labels, then type and class.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += usize::from(buf[i]) + 1;
            }
            let q = &buf[12..(i + 5).min(n)];
            let mut r = vec![buf[0], buf[1], 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
            r.extend_from_slice(q);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 30, 10]);
            let _ = s.send_to(&r, from);
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("the upstream is up");
}

#[test]
fn a_managed_node_serves_each_networks_names_on_its_port_and_forwards_the_rest() {
    crate::need_root!();
    let _g = crate::serial();
    let mut lab = Lab::new("ds");
    let node = lab.ns("n");
    let tasks: Vec<String> = ["t1", "t2", "t3"].iter().map(|t| lab.ns(t)).collect();
    let _etc = Etc(tasks.clone());
    ip(&format!("-n {node} addr add 198.18.61.1/32 dev lo"));
    let (seen, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
    upstream(&node, seen.clone(), stop.clone());
    let state = lab.dir.join("node1");
    let st = state.to_str().expect("utf-8 path").to_owned();
    #[rustfmt::skip]
    let p = lab.spawn(&node, "node1", &[BIN, "node", "run", "--name", "node1", "--state-dir", &st,
        "--advertise-addr", "198.18.61.1", "--data-path-addr", "198.18.61.2", "--data-iface", "mpup",
        "--io", "tap", "--metrics-addr", "off", "--dns-upstream", "127.0.0.1:5353"]);
    let sock = state.join("admin.sock");
    wait_for("node1 to start", 20, || {
        assert!(lab.running(p), "node1 exited:\n{}", lab.log(p));
        sock.exists()
    });
    let cli = |args: &[&str]| {
        let mut v = vec![BIN];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--state-dir", &st]);
        let o = crate::lab::run(&v);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cli(&["cluster", "init"]);
    cli(&["network", "create", "--subnet", "198.19.0.0/24", "app"]);
    cli(&["network", "create", "--subnet", "198.19.1.0/24", "--internal", "priv"]);
    cli(&["service", "create", "--name", "web", "--network", "app", "--vip-port", "80", "--target-port", "8080"]);
    cli(&["service", "create", "--name", "iweb", "--network", "priv", "--vip-port", "80", "--target-port", "8080"]);
    let a1 = cli(&["task", "attach", "--service", "web", "--node", "node1", "--netns", &tasks[0], "--id", "web.1"]);
    assert!(a1.trim().ends_with("on node1, DNS 198.19.0.254"), "{a1}");
    cli(&["task", "attach", "--service", "web", "--node", "node1", "--netns", &tasks[1], "--id", "web.2"]);
    cli(&["task", "attach", "--service", "iweb", "--node", "node1", "--netns", &tasks[2], "--id", "iweb.1"]);

    // app has VNI 4096 (port 25300), priv 4097 (25301).
    let ask = |port: u16, name: &str, tcp: bool| {
        let server = format!("169.254.77.1:{port}");
        let mut args = vec![BIN, "tool", "dns-raw", "--server", &server];
        let hex = query(name);
        args.extend_from_slice(&["--hex", &hex]);
        if tcp {
            args.push("--tcp");
        }
        in_ns_ok(&node, &args).trim().to_owned()
    };
    let answers = |port, name: &str, tcp| {
        let line = ask(port, name, tcp);
        let rcode = line.split_whitespace().next().unwrap_or_default().to_owned();
        let an = line.split_whitespace().find_map(|w| w.strip_prefix("an=")).unwrap_or_default().to_owned();
        format!("{rcode} {an}")
    };
    wait_for("app's names served", 10, || answers(25300, "tasks.web", false) == "rcode=NOERROR 2");
    assert_eq!(answers(25300, "web", false), "rcode=NOERROR 1");
    assert_eq!(answers(25300, "web.1.app", false), "rcode=NOERROR 1");
    assert_eq!(answers(25300, "tasks.web", true), "rcode=NOERROR 2", "over TCP");
    let seen_now = || seen.load(Ordering::Relaxed);
    wait_for("priv's names served", 10, || answers(25301, "iweb", false) == "rcode=NOERROR 1");
    assert_eq!(seen_now(), 0, "served here, never forwarded");
    // priv's names do not exist in app: forwarded like any other name.
    assert_eq!(answers(25300, "iweb", false), "rcode=NOERROR 1");
    assert_eq!(seen_now(), 1, "app's query for iweb went upstream");
    assert_eq!(answers(25300, "outside.test", false), "rcode=NOERROR 1", "forwarded, the upstream's answer");
    assert_eq!(seen_now(), 2);
    // A TCP query is forwarded over TCP: this upstream has none.
    assert_eq!(answers(25300, "outside.test", true), "rcode=SERVFAIL 0");
    assert_eq!(answers(25301, "outside.test", false), "rcode=SERVFAIL 0", "internal: never forwarded");
    assert_eq!(seen_now(), 2, "the upstream saw neither");
    // Malformed: QDCOUNT 0, then still answering.
    let bad = in_ns_ok(
        &node,
        &[BIN, "tool", "dns-raw", "--server", "169.254.77.1:25300", "--hex", "abcd01000000000000000000"],
    );
    assert!(bad.starts_with("rcode=FORMERR id=0xabcd"), "{bad}");
    assert_eq!(answers(25300, "web", false), "rcode=NOERROR 1", "still answering");

    // The tasks' resolv.conf, as their namespace sees it.
    let rc = in_ns_ok(&tasks[0], &["cat", "/etc/resolv.conf"]);
    assert!(rc.contains("nameserver 198.19.0.254\n") && rc.contains("options ndots:0\n"), "{rc}");
    let rc = in_ns_ok(&tasks[2], &["cat", "/etc/resolv.conf"]);
    assert!(rc.contains("nameserver 198.19.1.254\n"), "{rc}");

    let stats: serde_json::Value = serde_json::from_str(&cli(&["stats", "--format", "json"])).expect("json");
    let d = &stats["dataplane"]["dns"];
    assert_eq!(d["networks"], 2, "{d}");
    assert!(d["formerr"].as_u64() >= Some(1) && d["forwarded"].as_u64() >= Some(3), "{d}");
    assert!(d["queries_tcp"].as_u64() >= Some(2) && d["servfail"].as_u64() >= Some(2), "{d}");
    assert!(d["forward_errors"].as_u64() >= Some(1), "the TCP forward refused: {d}");

    // A task goes: its name and its resolv.conf with it.
    cli(&["task", "detach", "web.2"]);
    wait_for("web.2 out of tasks.web", 10, || answers(25300, "tasks.web", false) == "rcode=NOERROR 1");
    wait_for("web.2's resolv.conf removed", 10, || !Path::new("/etc/netns").join(&tasks[1]).exists());
    assert!(Path::new("/etc/netns").join(&tasks[0]).join("resolv.conf").exists());
    stop.store(true, Ordering::Relaxed);
    assert!(lab.stop(p), "node1 stops cleanly:\n{}", lab.log(p));
    assert!(!Path::new("/etc/netns").join(&tasks[0]).exists(), "removed when the node stops (its ports go)");
}
