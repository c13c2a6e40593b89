//! `meshplane trace` end to end: the binary on the committed example tables
//! and sample captures must write exactly the committed expected captures;
//! tshark must decode what meshplane emits as valid VXLAN; CLI mistakes get
//! a clear message and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshplane-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn trace(input: &Path, out: &Path, port: &str) -> std::process::Output {
    trace_with("examples/tables.toml", input, out, port)
}

fn trace_with(tables: &str, input: &Path, out: &Path, port: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshplane"))
        .args(["trace", "--tables"])
        .arg(root().join(tables))
        .arg("--in")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(["--in-port", port, "-v"])
        .output()
        .unwrap()
}

/// Checked against what tshark decodes (see `tshark_decodes_meshplane_vxlan`)
/// and by hand when the expected captures were made; regenerate with the
/// commands in examples/trace/README.md only after re-checking.
#[test]
fn sample_captures_give_the_expected_output() {
    for (port, input, expected) in
        [("task1", "task1-in.pcap", "task1-out.pcap"), ("uplink", "uplink-in.pcap", "uplink-out.pcap")]
    {
        let out = tmp(expected);
        let o = trace(&root().join("examples/trace").join(input), &out, port);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(&out).unwrap();
        let want = std::fs::read(root().join("examples/trace").join(expected)).unwrap();
        assert!(got == want, "{expected}: output capture differs from the committed one");
        let stdout = String::from_utf8_lossy(&o.stdout);
        if port == "task1" {
            assert!(stdout.contains("trace: 12 frames in on task1: 8 sent, 4 dropped, 0 passed"), "{stdout}");
            for reason in ["unknown_unicast", "src_mac_spoofed", "arp_unknown_target", "broadcast_not_flooded"] {
                assert!(stdout.contains(&format!("-> drop {reason}")), "{reason} missing from:\n{stdout}");
            }
        } else {
            assert!(stdout.contains("trace: 13 frames in on uplink: 4 sent, 0 dropped, 9 passed"), "{stdout}");
        }
    }
}

fn tshark() -> Option<PathBuf> {
    let found =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("tshark")).find(|p| p.exists()));
    if found.is_none() {
        assert!(
            std::env::var_os("MESHPLANE_REQUIRE_TSHARK").is_none(),
            "tshark is required (scripts/bootstrap installs it)"
        );
        eprintln!("SKIPPED: tshark not installed (scripts/bootstrap installs it; scripts/test requires it)");
    }
    found
}

#[test]
fn tshark_decodes_meshplane_vxlan() {
    let Some(tshark) = tshark() else { return };
    let out = tmp("tshark.pcap");
    let o = trace(&root().join("examples/trace/task1-in.pcap"), &out, "task1");
    assert!(o.status.success());
    let o = Command::new(tshark)
        .arg("-r")
        .arg(&out)
        .args(["-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"])
        .args(["-Y", "vxlan", "-T", "fields", "-E", "separator=|"])
        .args(["-e", "vxlan.vni", "-e", "vxlan.flags", "-e", "udp.dstport", "-e", "udp.checksum"])
        .args([
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "ip.checksum.status",
            "-e",
            "_ws.col.Protocol",
            "-e",
            "_ws.expert",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    // Frames 2, 3, 4 of the sample go to node 2: ICMP, UDP, TCP.
    assert_eq!(lines.len(), 3, "{text}");
    for (line, proto) in lines.iter().zip(["ICMP", "UDP", "TCP"]) {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], "4096", "vni: {line}");
        assert_eq!(f[1], "0x0800", "flags: only I set: {line}");
        assert!(f[2].starts_with("4789"), "outer dport: {line}");
        assert!(f[3].starts_with("0x0000"), "outer udp checksum 0: {line}");
        assert_eq!(f[4], "198.18.0.1,198.19.0.1", "outer and inner source: {line}");
        assert_eq!(f[5], "198.18.0.2,198.19.0.2", "outer and inner destination: {line}");
        assert_eq!(f[6], "1,1", "outer and inner IPv4 checksums good: {line}");
        assert_eq!(f[7], proto, "inner protocol: {line}");
        // Expert info of severity Chat/Note (a SYN, say) is fine; Warning or
        // Error (malformed, bad checksum) is not.
        let expert = f.get(8).copied().unwrap_or("");
        assert!(!expert.contains("(Warning/") && !expert.contains("(Error/"), "tshark expert info: {line}");
    }
}

#[test]
fn cli_mistakes_are_clear_errors() {
    let out = tmp("never.pcap");
    let o = trace(&root().join("examples/trace/task1-in.pcap"), &out, "task9");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown port \"task9\"") && err.contains("uplink, task1, task3, db1"), "{err}");

    let o = trace(&root().join("examples/trace/nope.pcap"), &out, "uplink");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.pcap"));

    let o = trace(&root().join("examples/tables.toml"), &out, "uplink");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a classic pcap file"));

    let bad = tmp("bad.toml");
    std::fs::write(&bad, "[node]\ndata_ip = \"198.18.0.1\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_meshplane"))
        .args(["trace", "--tables"])
        .arg(&bad)
        .args(["--in", "x", "--out", "y"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing field `data_mac`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn node_run_refuses_a_connection_table_it_cannot_have() {
    for n in ["0", "2000000000"] {
        let o = Command::new(env!("CARGO_BIN_EXE_meshplane"))
            .args(["node", "run", "--tables"])
            .arg(root().join("examples/tables.toml"))
            .args(["--io", "tap", "--uplink", "mp-none", "--conntrack", n])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--conntrack: 8 to 1073741824 entries per worker") && err.contains(n), "{err}");
    }
}

/// The load-balancer samples (examples/tables-lb.toml: a VIP service, a
/// `nat` and a `preserve-source` published port): the committed expected
/// captures, byte for byte, and (independently of meshplane's own decoder)
/// tshark's reading of every rewrite.
#[test]
fn load_balancer_samples_show_the_expected_rewrites() {
    // eth.src eth.dst ip.src ip.dst tcp ports vni (inner fields last for VXLAN)
    let want: [(&str, &str, &str, &[&str]); 2] = [
        (
            "uplink",
            "lb-uplink-in.pcap",
            "lb-uplink-out.pcap",
            &[
                // nat → T3 here: DNAT to T3:8080, SNAT to 198.19.0.250.
                "198.19.0.250|198.19.0.3|40001|8080|",
                // nat → T2 on node 2: the same inside VXLAN 4096.
                "198.18.0.1,198.19.0.250|198.18.0.2,198.19.0.2|40002|8080|4096",
                // T2's answer back to the client, from 198.18.0.1:30080.
                "198.18.0.1|198.18.5.5|30080|40002|",
                // preserve-source → T3: the task sees the client.
                "198.18.5.5|198.19.0.3|40003|8080|",
                "198.18.0.1,198.18.5.5|198.18.0.2,198.19.0.2|40004|8080|4096",
                "198.18.0.1|198.18.5.5|30081|40004|",
            ],
        ),
        (
            "task1",
            "lb-task1-in.pcap",
            "lb-task1-out.pcap",
            &[
                "198.19.0.1|198.19.0.3|50001|8080|",
                "198.18.0.1,198.19.0.1|198.18.0.2,198.19.0.2|50002|8080|4096",
                "||||",
            ],
        ),
    ];
    for (port, input, expected, rows) in want {
        let out = tmp(expected);
        let o = trace_with("examples/tables-lb.toml", &root().join("examples/trace").join(input), &out, port);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(&out).unwrap();
        let committed = std::fs::read(root().join("examples/trace").join(expected)).unwrap();
        assert!(got == committed, "{expected}: output capture differs from the committed one");
        let stdout = String::from_utf8_lossy(&o.stdout);
        let services: &[&str] = if port == "uplink" {
            &[
                "service web-nat: 2 new connections, 2 packets (by backend: 198.19.0.3:8080 1, 198.19.0.2:8080 1)",
                "service web-ps: 2 new connections, 2 packets (by backend: 198.19.0.3:8080 1, 198.19.0.2:8080 1)",
            ]
        } else {
            &["service web-vip: 2 new connections, 2 packets (by backend: 198.19.0.3:8080 1, 198.19.0.2:8080 1)"]
        };
        for line in services {
            assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
        }
        let Some(tshark) = tshark() else { continue };
        let t = Command::new(tshark)
            .arg("-r")
            .arg(&out)
            .args([
                "-o",
                "ip.check_checksum:TRUE",
                "-o",
                "tcp.check_checksum:TRUE",
                "-T",
                "fields",
                "-E",
                "separator=|",
            ])
            .args(["-e", "ip.src", "-e", "ip.dst", "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "vxlan.vni"])
            .args(["-e", "ip.checksum.status", "-e", "tcp.checksum.status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&t.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), rows.len(), "{expected}:\n{text}");
        for (line, row) in lines.iter().zip(rows) {
            assert!(line.starts_with(row), "{expected}: tshark read {line:?}, expected {row:?}");
            // Every IPv4 and TCP checksum tshark checked is good (status 1).
            for status in line.split('|').skip(5) {
                assert!(status.split(',').all(|s| s.is_empty() || s == "1"), "{expected}: bad checksum in {line:?}");
            }
        }
    }
}
