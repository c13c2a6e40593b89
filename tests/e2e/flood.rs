//! The connection table under attack (issue 17): a flood of spoofed TCP
//! ACKs from random sources (`hping3 --rand-source -A`, 25 000 a second,
//! bounded in packets and seconds) at a published port of the routing mesh (`nat`
//! mode) while `wrk` runs keep-alive HTTP through the same port to nginx in
//! task 2: wrk sees no error, and the node counted the flood (unconfirmed
//! pickups, and what the flood guard and the full buckets refused).
//!
//! The spoofed sources are random addresses (hping3 draws them from the
//! whole IPv4 space); they exist only on the test's own bridge, inside its
//! namespaces: the node's answers go back to the client namespace's MAC,
//! whose kernel drops them.

use super::lab::{in_ns, in_ns_ok, wait_for};
use super::{Cluster, Io, serial};
use crate::need_root;
use std::time::{Duration, Instant};

/// Starts nginx in `ns` on 198.19.0.2:5001 (the mesh services' target);
/// its process index.
fn nginx(c: &mut Cluster, ns: &str) -> usize {
    let d = c.lab.dir.join("nginx");
    std::fs::create_dir_all(d.join("www")).expect("nginx dir");
    std::fs::write(d.join("www/index.html"), "<html><body>meshplane flood test</body></html>\n").expect("page");
    let _ = std::process::Command::new("chmod").args(["-R", "a+rX", c.lab.dir.to_str().unwrap_or("/")]).status();
    let _ = std::process::Command::new("chmod").args(["711", &std::env::temp_dir().to_string_lossy()]).status();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\nhttp {{ access_log off; default_type text/html; keepalive_requests 10000000;\n\
         server {{ listen 198.19.0.2:5001; root {d}/www; }} }}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("nginx.conf");
    let conf = d.join("nginx.conf");
    let p = c.lab.spawn(
        ns,
        "nginx",
        &["nginx", "-c", conf.to_str().unwrap_or_default(), "-p", d.to_str().unwrap_or_default()],
    );
    let lab = &mut c.lab;
    wait_for("nginx to listen", 10, || {
        assert!(lab.running(p), "nginx exited: {}", lab.log(p));
        String::from_utf8_lossy(&in_ns(ns, &["ss", "-ltn"]).stdout).contains(":5001 ")
    });
    p
}

/// A worker-0 counter of node i's stats file.
fn counter(c: &Cluster, i: usize, name: &str) -> u64 {
    c.stats(i)["workers"][0][name].as_u64().unwrap_or(0)
}

pub(super) fn flood(io: Io) {
    let _g = serial();
    if std::process::Command::new("hping3").arg("--version").output().is_err() {
        eprintln!("SKIP: hping3 is not installed (scripts/bootstrap installs it)");
        return;
    }
    let mut c = Cluster::two_nodes(&format!("ctg-{}", io.arg()), io, true);
    let client = c.client();
    let t2 = c.tasks[1].clone();
    let web = nginx(&mut c, &t2);
    // The page through the mesh first (nat mode, node 1, task 2 on node 2).
    let page = in_ns_ok(&client, &["curl", "-sS", "--max-time", "5", "http://198.18.0.1:30080/"]);
    assert!(page.contains("meshplane flood test"), "{page}");
    let before = counter(&c, 0, "conntrack_unconfirmed");

    // wrk: 16 keep-alive connections for 10 s; the flood starts 2 s in.
    let wrk = c.lab.spawn(
        &client,
        "wrk",
        &["timeout", "20", "wrk", "-t1", "-c16", "-d10s", "--timeout", "3s", "http://198.18.0.1:30080/"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    // Bounded: 100 000 packets at 25 000 a second, or 6 s. Not `--flood`:
    // hping3 ignores `-c` there, and as fast as it can send (100 000 a
    // second and more) it overruns the node's CPU (a debug build, on
    // cores shared with wrk and nginx), so the kernel's queue in front of
    // the dataplane drops wrk's frames with the flood's, at random: that
    // tests the machine, not the connection table. At this rate the
    // table still sees tens of thousands of new sources a second.
    let _ = in_ns(
        &client,
        &["timeout", "6", "hping3", "--rand-source", "-A", "-i", "u40", "-c", "100000", "-p", "30080", "198.18.0.1"],
    );
    let flood_secs = started.elapsed().as_secs_f64();
    let lab = &mut c.lab;
    wait_for("wrk to finish", 20, || !lab.running(wrk));
    let out = c.lab.log(wrk);
    eprintln!("flood: hping3 ran {flood_secs:.1} s; wrk:\n{out}");
    let requests: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{out}"));
    assert!(requests > 100, "{out}");
    assert!(!out.contains("Socket errors"), "wrk saw socket errors:\n{out}");
    assert!(!out.contains("Non-2xx"), "wrk saw bad answers:\n{out}");

    // The flood was counted: unconfirmed pickups, and whatever the guard
    // and full buckets refused; the established connections stayed (wrk's
    // 16 connections never failed, above), and are still tracked, both
    // directions, confirmed.
    wait_for("the stats file to catch up", 5, || counter(&c, 0, "conntrack_unconfirmed") > before + 1000);
    let s = &c.stats(0)["workers"][0];
    eprintln!(
        "node 1: unconfirmed {} confirmed {} flood-guard drops {} evicted {} entries {} drops {}",
        s["conntrack_unconfirmed"],
        s["conntrack_confirmed"],
        s["conntrack_guarded"],
        s["conntrack_evicted"],
        s["conntrack_entries"],
        s["drops"]
    );
    let flood = s["conntrack_unconfirmed"].as_u64().unwrap_or(0) + s["conntrack_guarded"].as_u64().unwrap_or(0);
    assert!(flood > 10_000, "the flood was counted: {s}");
    // Each frame the guard refused is a counted drop of that reason (the
    // reason is absent while nothing was refused).
    let guarded = s["conntrack_guarded"].as_u64().unwrap_or(0);
    assert_eq!(s["drops"]["new_conn_rate_limited"].as_u64().unwrap_or(0), guarded, "{s}");
    let again = in_ns_ok(&client, &["curl", "-sS", "--max-time", "5", "http://198.18.0.1:30080/"]);
    assert!(again.contains("meshplane flood test"), "{again}");
    assert!(c.lab.running(web), "nginx still runs");
    c.stop_node(0);
    c.stop_node(1);
}

both_backends!(flood: conntrack_flood_afxdp, conntrack_flood_tap);
