//! `meshplane pktgen`: a traffic generator on AF_XDP (TAP as a fallback),
//! with a receive side that counts what comes back and measures latency
//! from a timestamp in the payload. Always bounded by a frame count and a
//! duration.
//!
//! Every frame carries 16 bytes of payload: a magic number, a sequence
//! number and the send time (nanoseconds since the generator started),
//! which the receive side finds wherever the frame was rewritten or
//! encapsulated on the way (it looks for the magic number).

use anyhow::{Context, Result, bail};
use meshplane_dataplane::io::{BURST, Port};
use meshplane_dataplane::wire::checksum;
use serde::Serialize;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What to send.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Profile {
    /// UDP datagrams (one flow, or `--flows` flows).
    Udp,
    /// TCP SYNs, each one a new flow (source port and address move on).
    Syn,
    /// UDP inside VXLAN toward a node (`--vni`, `--inner-*`).
    Vxlan,
}

/// Arguments of `meshplane pktgen`.
#[derive(clap::Args, Debug)]
pub(crate) struct PktgenArgs {
    /// Interface to send on (AF_XDP; with `--io tap`, a TAP device).
    #[arg(long)]
    iface: String,
    /// Interface to count returning frames on (default: `--iface`).
    #[arg(long)]
    rx: Option<String>,
    /// I/O backend.
    #[arg(long, value_enum, default_value = "afxdp")]
    io: crate::node::IoKind,
    /// Traffic profile.
    #[arg(long, value_enum, default_value = "udp")]
    profile: Profile,
    /// Distinct flows (source addresses and ports varied); `syn` makes
    /// every frame a new flow.
    #[arg(long, default_value_t = 1)]
    flows: u32,
    /// Frame size in bytes without the FCS (60 = a 64-byte frame on the
    /// wire), or 0 for IMIX (7:4:1 of 60, 590, 1514).
    #[arg(long, default_value_t = 60)]
    size: usize,
    /// Frames per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Frames to send at most.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Seconds to send for at most.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to keep counting after the last frame was sent.
    #[arg(long, default_value_t = 0.5)]
    settle: f64,
    /// Source MAC.
    #[arg(long)]
    src_mac: meshplane_dataplane::wire::MacAddr,
    /// Destination MAC.
    #[arg(long)]
    dst_mac: meshplane_dataplane::wire::MacAddr,
    /// Source address (the first flow's; flows count up from it).
    #[arg(long)]
    src_ip: Ipv4Addr,
    /// Destination address.
    #[arg(long)]
    dst_ip: Ipv4Addr,
    /// Source port of the first flow.
    #[arg(long, default_value_t = 1024)]
    src_port: u16,
    /// Destination port (`vxlan`: of the inner datagram).
    #[arg(long, default_value_t = 5001)]
    dst_port: u16,
    /// `vxlan`: the VNI.
    #[arg(long, default_value_t = 4096)]
    vni: u32,
    /// `vxlan`: inner source MAC.
    #[arg(long)]
    inner_src_mac: Option<meshplane_dataplane::wire::MacAddr>,
    /// `vxlan`: inner destination MAC.
    #[arg(long)]
    inner_dst_mac: Option<meshplane_dataplane::wire::MacAddr>,
    /// `vxlan`: inner source address.
    #[arg(long)]
    inner_src_ip: Option<Ipv4Addr>,
    /// `vxlan`: inner destination address.
    #[arg(long)]
    inner_dst_ip: Option<Ipv4Addr>,
    /// Pin the generator to this core.
    #[arg(long)]
    core: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

const MAGIC: [u8; 4] = *b"MPg1";
const PAYLOAD: usize = 16;
const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;
const TCP: usize = 20;

/// Writes Ethernet + IPv4 + UDP/TCP headers for a packet of `total` IPv4
/// bytes into `f`; returns the transport payload offset.
#[allow(clippy::too_many_arguments)]
fn l2l3l4(
    f: &mut [u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    total: usize,
) -> usize {
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[ETH..ETH + IP];
    ip.copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let l4 = ETH + IP;
    f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
    if proto == 17 {
        f[l4 + 4..l4 + 6].copy_from_slice(&((total - IP) as u16).to_be_bytes());
        f[l4 + 6..l4 + 8].fill(0); // no UDP checksum (IPv4 allows it)
        l4 + UDP
    } else {
        // SYN, data offset 5, window 64240.
        f[l4 + 4..l4 + 20].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
        l4 + TCP
    }
}

/// The generator's frames: flow `i`'s frame of `size` bytes, with the
/// sequence number and send time filled in by [`Gen::stamp`].
struct Gen<'a> {
    a: &'a PktgenArgs,
}

impl Gen<'_> {
    fn flow_addr(&self, flow: u32) -> (Ipv4Addr, u16) {
        // Ports first, then addresses (from 198.18.0.0/15 as given).
        let port = self.a.src_port.wrapping_add((flow % 50_000) as u16);
        let ip = Ipv4Addr::from(u32::from(self.a.src_ip).wrapping_add(flow / 50_000));
        (ip, port)
    }

    /// Builds the frame for `flow` of `size` bytes into `f`; the payload
    /// offset (where the stamp goes), and the TCP checksum's offset and
    /// pseudo-header sum for SYNs.
    fn build(&self, f: &mut [u8], flow: u32, size: usize) -> (usize, Option<(usize, u32)>) {
        let a = self.a;
        let (sip, sport) = self.flow_addr(flow);
        match a.profile {
            Profile::Udp => {
                let size = size.max(ETH + IP + UDP + PAYLOAD);
                let off = l2l3l4(f, a.src_mac.0, a.dst_mac.0, sip, a.dst_ip, 17, sport, a.dst_port, size - ETH);
                f[off..size].fill(0);
                (off, None)
            }
            Profile::Syn => {
                let size = size.max(ETH + IP + TCP + PAYLOAD);
                let off = l2l3l4(f, a.src_mac.0, a.dst_mac.0, sip, a.dst_ip, 6, sport, a.dst_port, size - ETH);
                f[off..size].fill(0);
                let pseudo = checksum::pseudo_header_v4(sip, a.dst_ip, 6, (size - ETH - IP) as u16);
                (off, Some((ETH + IP + 16, pseudo)))
            }
            Profile::Vxlan => {
                const OUTER: usize = ETH + IP + UDP + 8;
                let size = size.max(OUTER + ETH + IP + UDP + PAYLOAD);
                let isrc = a.inner_src_ip.unwrap_or(sip);
                let isrc = Ipv4Addr::from(u32::from(isrc).wrapping_add(flow / 50_000));
                let (imac_s, imac_d) = (
                    a.inner_src_mac.map_or([2, 0, 0, 0, 1, 1], |m| m.0),
                    a.inner_dst_mac.map_or([2, 0, 0, 0, 1, 2], |m| m.0),
                );
                let idst = a.inner_dst_ip.unwrap_or(a.dst_ip);
                // Outer source port from the flow, as a VTEP would.
                let osport = 49152 + (flow % 16384) as u16;
                let off = l2l3l4(f, a.src_mac.0, a.dst_mac.0, a.src_ip, a.dst_ip, 17, osport, 4789, size - ETH);
                f[off..off + 8].copy_from_slice(&[0x08, 0, 0, 0, 0, 0, 0, 0]);
                f[off + 4..off + 7].copy_from_slice(&a.vni.to_be_bytes()[1..]);
                let inner = &mut f[OUTER..size];
                let n = inner.len();
                let ioff = l2l3l4(inner, imac_s, imac_d, isrc, idst, 17, sport, a.dst_port, n - ETH);
                inner[ioff..].fill(0);
                (OUTER + ioff, None)
            }
        }
    }

    /// Writes sequence number and send time into a built frame.
    fn stamp(f: &mut [u8], off: usize, seq: u32, t: u64, tcp: Option<(usize, u32)>, len: usize) {
        f[off..off + 4].copy_from_slice(&MAGIC);
        f[off + 4..off + 8].copy_from_slice(&seq.to_be_bytes());
        f[off + 8..off + 16].copy_from_slice(&t.to_be_bytes());
        if let Some((at, pseudo)) = tcp {
            f[at..at + 2].fill(0);
            let c = checksum::finish(checksum::sum(&f[ETH + IP..len], pseudo));
            f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// The frame last built: its flow, size, payload offset and TCP checksum
/// facts.
type Built = (u32, usize, usize, Option<(usize, u32)>);

/// IMIX: 7 of 60, 4 of 590, 1 of 1514 bytes.
fn imix(i: u64) -> usize {
    match i % 12 {
        0..=6 => 60,
        7..=10 => 590,
        _ => 1514,
    }
}

/// The run's result.
#[derive(Serialize, Debug)]
struct Summary {
    profile: Profile,
    flows: u32,
    sent: u64,
    /// Frames the port could not take (ring full), not counted as sent.
    refused: u64,
    received: u64,
    loss_pct: f64,
    seconds: f64,
    tx_mpps: f64,
    tx_gbps: f64,
    rx_mpps: f64,
    rx_gbps: f64,
    latency_us_p50: Option<f64>,
    latency_us_p99: Option<f64>,
    latency_us_p999: Option<f64>,
}

fn open(kind: crate::node::IoKind, iface: &str) -> Result<Box<dyn Port>> {
    Ok(match kind {
        crate::node::IoKind::Tap => Box::new(meshplane_dataplane::io::tap::TapPort::open(iface)?),
        crate::node::IoKind::Afxdp => {
            let cfg = meshplane_dataplane::io::afxdp::AfXdpConfig { ring: 4096, frames: 16384, ..Default::default() };
            Box::new(meshplane_dataplane::io::afxdp::AfXdpPort::open(iface, 0, &cfg, None)?)
        }
    })
}

/// Counts stamped frames of a received burst: (frames, bytes), and their
/// latencies (sampled) at `now`.
fn count_rx(port: &mut dyn Port, now: u64, lat: &mut Vec<u32>, rx: &mut (u64, u64)) -> usize {
    port.rx_burst(&mut |frames, _back| {
        for f in frames.iter() {
            let d = f.data();
            // The stamp is somewhere after the first headers.
            let end = d.len().saturating_sub(PAYLOAD - 4);
            let Some(at) = (14..end).find(|&i| d[i..i + 4] == MAGIC) else { continue };
            let Some(ts) = d.get(at + 8..at + 16) else { continue };
            let t = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
            rx.0 += 1;
            rx.1 += d.len() as u64;
            if lat.len() < 4_000_000 {
                lat.push(now.saturating_sub(t).min(u64::from(u32::MAX)) as u32);
            }
        }
    })
}

fn pct(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(sorted[i]) / 1000.0)
}

/// Refuses arguments that would make the generator unbounded or its
/// frames impossible.
fn check(a: &PktgenArgs) -> Result<()> {
    if a.count == 0 || !(a.duration > 0.0 && a.duration <= 3600.0) {
        bail!("--count must be above 0 and --duration within (0, 3600] seconds: the generator is always bounded");
    }
    if a.size != 0 && !(60..=1514).contains(&a.size) {
        bail!("--size must be 60 to 1514 bytes (or 0 for IMIX), got {}", a.size);
    }
    if a.flows == 0 {
        bail!("--flows must be at least 1");
    }
    if !(0.0..=60.0).contains(&a.settle) {
        bail!("--settle must be 0 to 60 seconds, got {}", a.settle);
    }
    if let Some(c) = a.core {
        crate::sys::check_core(c).context("--core")?;
    }
    if a.profile == Profile::Vxlan && a.size != 0 && a.size < 110 {
        bail!("--profile vxlan needs --size 110 or more (outer and inner headers and the stamp)");
    }
    Ok(())
}

/// What a run counts as it goes.
struct Tally {
    sent: u64,
    refused: u64,
    tx_bytes: u64,
    /// Stamped frames received: (frames, bytes).
    rx: (u64, u64),
    /// Their latencies (sampled), in nanoseconds.
    lat: Vec<u32>,
}

/// The ports of a run, and its clock.
struct Ports {
    tx: Box<dyn Port>,
    /// The port returning frames are counted on, if not `tx`.
    rx: Option<Box<dyn Port>>,
    start: Instant,
}

impl Ports {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Counts what came back by `n` on the receive port (or, without
    /// one, on the transmit port).
    fn count_back(&mut self, n: u64, t: &mut Tally) -> usize {
        match self.rx.as_deref_mut() {
            Some(p) => count_rx(p, n, &mut t.lat, &mut t.rx),
            None => count_rx(self.tx.as_mut(), n, &mut t.lat, &mut t.rx),
        }
    }
}

/// Sends until `--count` frames or `--duration` seconds, at `--rate`,
/// counting what comes back meanwhile.
fn send(a: &PktgenArgs, p: &mut Ports, t: &mut Tally) {
    let g = Gen { a };
    let deadline = Duration::from_secs_f64(a.duration);
    let mut frame = vec![0u8; 1514];
    let mut seq = 0u64;
    // Built frames are reused while the flow and size repeat.
    let mut built: Option<Built> = None;
    while t.sent < a.count && p.start.elapsed() < deadline {
        let batch = BURST.min((a.count - t.sent) as usize);
        if a.rate > 0 {
            // Send the batch when its time has come.
            let due = Duration::from_secs_f64(t.sent as f64 / a.rate as f64);
            while p.start.elapsed() < due {
                p.count_back(p.now(), t);
                std::hint::spin_loop();
            }
        }
        let now = p.now();
        for _ in 0..batch {
            let flow = match a.profile {
                Profile::Syn => seq as u32,
                _ => (seq % u64::from(a.flows)) as u32,
            };
            let size = if a.size == 0 { imix(seq) } else { a.size };
            let (off, tcp) = match built {
                Some((f, s, off, tcp)) if f == flow && s == size => (off, tcp),
                _ => {
                    let (off, tcp) = g.build(&mut frame, flow, size);
                    built = Some((flow, size, off, tcp));
                    (off, tcp)
                }
            };
            let len = size.max(off + PAYLOAD);
            Gen::stamp(&mut frame, off, seq as u32, now, tcp, len);
            if p.tx.tx_copy(&frame[..len]) {
                t.sent += 1;
                t.tx_bytes += len as u64;
            } else {
                t.refused += 1;
            }
            seq += 1;
        }
        p.tx.flush();
        let n = p.now();
        if let Some(r) = p.rx.as_deref_mut() {
            count_rx(r, n, &mut t.lat, &mut t.rx);
        }
        count_rx(p.tx.as_mut(), n, &mut t.lat, &mut t.rx);
        if t.refused > 0 && t.refused.is_multiple_of(4096) {
            // The ring is full: let the device drain.
            std::thread::yield_now();
        }
    }
}

/// The figures of a run that sent for `send_secs`.
fn summary(a: &PktgenArgs, t: &mut Tally, send_secs: f64) -> Summary {
    t.lat.sort_unstable();
    let (sent, rx, lat) = (t.sent, t.rx, &t.lat);
    let wire = |frames: u64, bytes: u64| (bytes + frames * 24) as f64 * 8.0 / send_secs / 1e9; // + FCS, preamble, gap
    Summary {
        profile: a.profile,
        flows: if a.profile == Profile::Syn { sent.min(u64::from(u32::MAX)) as u32 } else { a.flows },
        sent,
        refused: t.refused,
        received: rx.0,
        loss_pct: if sent == 0 { 0.0 } else { (sent.saturating_sub(rx.0)) as f64 * 100.0 / sent as f64 },
        seconds: send_secs,
        tx_mpps: sent as f64 / send_secs / 1e6,
        tx_gbps: wire(sent, t.tx_bytes),
        rx_mpps: rx.0 as f64 / send_secs / 1e6,
        rx_gbps: wire(rx.0, rx.1),
        latency_us_p50: pct(lat, 0.5),
        latency_us_p99: pct(lat, 0.99),
        latency_us_p999: pct(lat, 0.999),
    }
}

/// Runs the generator and prints its figures.
pub(crate) fn run(a: &PktgenArgs) -> Result<()> {
    check(a)?;
    if let Some(c) = a.core {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let tx = open(a.io, &a.iface)?;
    let rx = match &a.rx {
        Some(i) if *i != a.iface => Some(open(a.io, i)?),
        _ => None,
    };
    let mut p = Ports { tx, rx, start: Instant::now() };
    let mut t = Tally { sent: 0, refused: 0, tx_bytes: 0, rx: (0, 0), lat: Vec::with_capacity(1 << 20) };
    send(a, &mut p, &mut t);
    let send_secs = p.start.elapsed().as_secs_f64();
    // What the port took into its ring (frames it had no room for are
    // refused, not sent).
    let io = p.tx.stats();
    t.refused += t.sent.saturating_sub(io.tx);
    // (In u128: bytes times frames passes u64 on long runs.)
    t.tx_bytes = (u128::from(t.tx_bytes) * u128::from(io.tx.min(t.sent)))
        .checked_div(u128::from(t.sent))
        .map_or(0, |b| u64::try_from(b).unwrap_or(u64::MAX));
    t.sent = io.tx.min(t.sent);
    // Keep counting what is still on its way.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs_f64(a.settle) {
        let n = p.now();
        p.tx.flush();
        if p.count_back(n, &mut t) == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let s = summary(a, &mut t, send_secs);
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let l = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
        println!(
            "pktgen {:?}, {} flows: sent {} ({} refused) in {:.2} s = {:.3} Mpps {:.3} Gbps; received {} = {:.3} Mpps {:.3} Gbps; loss {:.2}%; latency p50 {} us, p99 {} us, p99.9 {} us",
            s.profile,
            s.flows,
            s.sent,
            s.refused,
            s.seconds,
            s.tx_mpps,
            s.tx_gbps,
            s.received,
            s.rx_mpps,
            s.rx_gbps,
            s.loss_pct,
            l(s.latency_us_p50),
            l(s.latency_us_p99),
            l(s.latency_us_p999)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds checked before any port opens: a clear error, never a panic
    /// after the run (a negative or infinite settle, a core past any cpu
    /// set).
    #[test]
    fn bad_settle_and_core_are_refused_up_front() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: PktgenArgs,
        }
        use clap::Parser;
        let args = |more: &[&str]| {
            let base = ["x", "--iface", "g0", "--src-mac", "02:00:00:00:00:01", "--dst-mac", "02:00:00:00:00:02"];
            let ips = ["--src-ip", "198.18.0.1", "--dst-ip", "198.18.0.2"];
            Cli::try_parse_from([&base[..], &ips, more].concat()).expect("flags").a
        };
        check(&args(&[])).expect("the defaults are fine");
        for (flags, says) in [
            (&["--settle=-1"][..], "--settle"),
            (&["--settle", "inf"], "--settle"),
            (&["--settle", "NaN"], "--settle"),
            (&["--core", "1024"], "core 1024 is past what a cpu set can name"),
            (&["--core", "18446744073709551615"], "past what a cpu set can name"),
        ] {
            let e = check(&args(flags)).expect_err(&format!("{flags:?} accepted"));
            assert!(format!("{e:#}").contains(says), "{flags:?}: {e:#}");
        }
    }
}
