//! `meshplane trace`: the pipeline run offline over a capture.

use anyhow::{Context, Result, bail};
use meshplane_dataplane::packet::{Frame, HEADROOM, Verdict};
use meshplane_dataplane::pcap;
use meshplane_dataplane::pipeline::{WorkerState, process};
use meshplane_dataplane::tables::Tables;
use meshplane_dataplane::wire::arp::{ArpRepr, Operation};
use meshplane_dataplane::wire::ipv4::{Ipv4Packet, protocol};
use meshplane_dataplane::wire::parse::{Fragment, L3, L4, Parsed, parse_frame};
use meshplane_dataplane::wire::vxlan::{self, VxlanHeader};
use meshplane_dataplane::wire::{MacAddr, icmpv4};
use std::fmt::Write as _;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;

/// Arguments of `meshplane trace`.
#[derive(clap::Args, Debug)]
pub(crate) struct TraceArgs {
    /// Tables file (TOML; see examples/tables.toml).
    #[arg(long)]
    tables: PathBuf,
    /// Capture to read (classic pcap, Ethernet, as `tcpdump -w` writes).
    #[arg(long = "in", value_name = "IN.pcap")]
    input: PathBuf,
    /// Capture to write: every frame the dataplane would transmit, on any port.
    #[arg(long = "out", value_name = "OUT.pcap")]
    output: PathBuf,
    /// The port the frames arrive on: `uplink` or a task port's name.
    #[arg(long, default_value = "uplink")]
    in_port: String,
    /// One line per frame: input summary, verdict, drop reason.
    #[arg(short, long)]
    verbose: bool,
}

/// Runs the trace; prints a summary (and per-frame lines with `-v`).
pub(crate) fn run(a: &TraceArgs) -> Result<()> {
    let path = a.tables.display().to_string();
    let t = Tables::load(&path)?;
    let Some(in_port) = t.port_id(&a.in_port) else {
        let names: Vec<&str> = t.ports.iter().map(|p| p.name.as_str()).collect();
        bail!("unknown port {:?}: the ports in {path} are {}", a.in_port, names.join(", "));
    };
    let file = std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?;
    let records = pcap::read(BufReader::new(file)).with_context(|| format!("reading {}", a.input.display()))?;
    let out = std::fs::File::create(&a.output).with_context(|| format!("creating {}", a.output.display()))?;
    let mut w = pcap::Writer::new(BufWriter::new(out))?;

    let mut st = WorkerState::for_tables(&t);
    let mut buf = vec![0u8; HEADROOM + pcap::MAX_RECORD as usize];
    let (mut sent, mut dropped, mut passed) = (0, 0, 0);
    for (i, r) in records.iter().enumerate() {
        let len = r.data.len();
        buf[HEADROOM..HEADROOM + len].copy_from_slice(&r.data);
        let Some(mut f) = Frame::new(&mut buf, HEADROOM, len) else { bail!("record {i}: frame too large") };
        let now = u64::from(r.ts_sec) * 1_000_000_000 + u64::from(r.ts_nsec);
        let v = process(&mut f, in_port, now, &t, &mut st);
        let verdict = match v {
            Verdict::Tx(p) => {
                sent += 1;
                w.write(r.ts_sec, r.ts_nsec, f.data())?;
                let port = t.ports.get(usize::from(p)).map_or("?", |p| p.name.as_str());
                format!("tx {port}: {}", describe(f.data()))
            }
            Verdict::Drop(reason) => {
                dropped += 1;
                format!("drop {}", reason.name())
            }
            Verdict::Pass => {
                passed += 1;
                "pass (to the kernel)".to_string()
            }
        };
        if a.verbose {
            println!("{:>4} {} {}\n     -> {verdict}", i + 1, a.in_port, describe(&r.data));
        }
    }
    w.finish()?;
    println!(
        "trace: {} frames in on {}: {sent} sent, {dropped} dropped, {passed} passed to the kernel; wrote {}",
        records.len(),
        a.in_port,
        a.output.display()
    );
    // What the balancer did, per service that saw traffic.
    for (svc, stats) in t.services.list.iter().zip(&st.lb.services).filter(|(_, s)| s.packets > 0) {
        let backends: Vec<String> = svc
            .backends
            .iter()
            .zip(&stats.backends)
            .map(|(b, s)| format!("{}:{} {}", b.ip, b.port, s.new_conns))
            .collect();
        println!(
            "service {}: {} new connections, {} packets (by backend: {})",
            svc.name,
            stats.new_conns,
            stats.packets,
            backends.join(", ")
        );
    }
    Ok(())
}

fn mac(m: MacAddr) -> String {
    m.to_string()
}

/// A one-line summary of a frame, tcpdump-like; VXLAN shows its inner frame.
pub(crate) fn describe(frame: &[u8]) -> String {
    let p = match parse_frame(frame) {
        Ok(p) => p,
        Err(e) => return format!("{} bytes, unparseable ({e})", frame.len()),
    };
    let mut s = String::new();
    let (dst, src) =
        (MacAddr(frame[0..6].try_into().unwrap_or([0; 6])), MacAddr(frame[6..12].try_into().unwrap_or([0; 6])));
    let _ = write!(s, "{} > {}", mac(src), mac(dst));
    if let Some(v) = p.vlan {
        let _ = write!(s, " vlan {v}");
    }
    let l3 = &frame[p.l3_offset..p.l3_end];
    match p.l3 {
        L3::Arp { .. } => match ArpRepr::parse(l3) {
            Ok(a) if a.operation == Operation::Request => {
                let _ = write!(s, " ARP who-has {} tell {}", a.target_ip, a.sender_ip);
            }
            Ok(a) if a.operation == Operation::Reply => {
                let _ = write!(s, " ARP {} is-at {}", a.sender_ip, a.sender_mac);
            }
            _ => s.push_str(" ARP"),
        },
        L3::Ipv4 { fragment, .. } => ipv4(&mut s, frame, &p, l3, fragment),
        L3::Ipv6 { protocol, .. } => {
            let _ = write!(s, " IPv6 next-header {protocol}");
        }
        L3::Other => {
            let _ = write!(s, " ethertype {:#06x}", p.ethertype);
        }
    }
    s
}

/// The IPv4 part of a frame's summary, and its transport's.
fn ipv4(s: &mut String, frame: &[u8], p: &Parsed, l3: &[u8], fragment: Fragment) {
    let Ok(ip) = Ipv4Packet::new_checked(l3) else { return };
    let _ = write!(s, ", {} > {}", ip.src(), ip.dst());
    if fragment != Fragment::No {
        let _ = write!(s, " frag off {}{}", ip.frag_offset(), if ip.more_frags() { "+" } else { "" });
    }
    if ip.dont_frag() {
        s.push_str(" DF");
    }
    let _ = write!(s, " len {}", ip.total_len());
    match p.l4 {
        L4::Udp { src_port, dst_port } => {
            let _ = write!(s, " UDP {src_port} > {dst_port}");
            let o = p.l4_offset.unwrap_or(p.l3_end) + 8;
            if dst_port == vxlan::DEFAULT_PORT
                && let Some(payload) = frame.get(o..p.l3_end)
                && let Ok(h) = VxlanHeader::parse(payload)
            {
                let _ = write!(s, " VXLAN vni {} [{}]", h.vni, describe(&payload[vxlan::HEADER_LEN..]));
            }
        }
        L4::Tcp { src_port, dst_port, flags, .. } => {
            let _ = write!(s, " TCP {src_port} > {dst_port} flags {flags:#04x}");
        }
        L4::Icmpv4 { kind, code } => {
            let what = match (kind, code) {
                (icmpv4::kind::ECHO_REQUEST, _) => "echo request".to_string(),
                (icmpv4::kind::ECHO_REPLY, _) => "echo reply".to_string(),
                (icmpv4::kind::DEST_UNREACHABLE, icmpv4::CODE_FRAG_NEEDED) => {
                    let o = p.l4_offset.unwrap_or(0);
                    let mtu = frame.get(o + 6..o + 8).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                    format!("unreachable, need to frag (mtu {mtu})")
                }
                (k, c) => format!("type {k} code {c}"),
            };
            let _ = write!(s, " ICMP {what}");
        }
        L4::Other => {
            let _ = write!(s, " proto {}", if ip.protocol() == protocol::ICMP { 1 } else { ip.protocol() });
        }
    }
}
