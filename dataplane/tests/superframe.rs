//! TCP super-frames (TSO) through the pipeline, frame in / frames out: a
//! super-frame with its checksum partial, as a task's kernel hands it to
//! a TAP, takes one decision (one conntrack lookup, one NAT, one
//! encapsulation), and the segments it is then cut into are exactly the
//! frames the pipeline makes of the same segments sent one by one. The
//! virtio-net header a TAP reads in front of a frame is checked before
//! any of this: a header that does not fit is refused.

use core::net::Ipv4Addr;
use meshplane_dataplane::io::tap::offload_of;
use meshplane_dataplane::io::{SEGMENT_ROOM, Sent, tx_segments};
use meshplane_dataplane::packet::{Frame, HEADROOM, Offload, Verdict};
use meshplane_dataplane::pipeline::{WorkerState, process};
use meshplane_dataplane::tables::{Tables, TablesSpec, UPLINK};
use meshplane_dataplane::wire::checksum;
use meshplane_dataplane::wire::gso::{Layout, segment};
use meshplane_dataplane::wire::virtio_net::{GsoKind, HEADER_LEN_TUNNEL, HEADER_LEN_V1, VirtioNetHdr, flags};

const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const T2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 5, 5];
const T1: [u8; 4] = [198, 19, 0, 1];
const T2: [u8; 4] = [198, 19, 0, 2];
const CLIENT: [u8; 4] = [198, 18, 5, 5];
const NODE1: [u8; 4] = [198, 18, 0, 1];
const TASK1: u16 = 1;
const MSS: u16 = 1398;

/// The example tables with this node's address in `app` and a published
/// service whose backends are T2 (node 2) and then T3 (local), round
/// robin, in `mode`.
fn mesh_tables(mode: &str) -> Tables {
    let base = include_str!("../../examples/tables.toml").replace(
        "gateway_mac = \"02:42:c6:13:00:fe\"",
        "gateway_mac = \"02:42:c6:13:00:fe\"\nnode_ip = \"198.19.0.250\"",
    );
    let svc = format!(
        "[[service]]\nname = \"web\"\nprotocol = \"tcp\"\nnetwork = \"app\"\ntarget_port = 8080\nscheduler = \"rr\"\n\
         published = [{{ port = 30080, mode = \"{mode}\" }}]\n[[service.backend]]\nip = \"198.19.0.2\"\n\
         [[service.backend]]\nip = \"198.19.0.3\"\n"
    );
    let spec: TablesSpec = toml::from_str(&format!("{base}\n{svc}")).expect("spec parses");
    Tables::compile(&spec).expect("tables compile")
}

/// A TCP frame of `payload` bytes (a pattern), ACK|PSH, seq 5000, IP ID 77;
/// with `partial`, its checksum field holds the pseudo-header's sum only,
/// as a kernel with checksum offload leaves it.
#[allow(clippy::too_many_arguments)]
fn tcp(
    dst: [u8; 6],
    src: [u8; 6],
    sip: [u8; 4],
    dip: [u8; 4],
    sport: u16,
    dport: u16,
    payload: usize,
    partial: bool,
) -> Vec<u8> {
    let data: Vec<u8> = (0..payload).map(|i| (i * 7 % 253) as u8).collect();
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .tcp(sport, dport, 5000, 65535)
        .ack(1)
        .psh()
        .write(&mut f, &data)
        .expect("builds");
    f[18..20].copy_from_slice(&77u16.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    if partial {
        let len = (f.len() - 34) as u16;
        let p = checksum::fold(checksum::pseudo_header_v4(sip.into(), dip.into(), 6, len));
        f[50..52].copy_from_slice(&p.to_be_bytes());
    }
    f
}

/// The offload of a TSO super-frame whose TCP header is at 34.
fn tso() -> Offload {
    Offload { gso_size: MSS, v6: false, ecn: false, csum_at: (HEADROOM + 34) as u32, csum_offset: 16 }
}

/// Runs `input` (with `offload`) through the pipeline; the verdict and
/// what leaves: the frame cut into segments as a port without the
/// offload sends it (itself if plain).
fn run(t: &Tables, st: &mut WorkerState, in_port: u16, input: &[u8], offload: Offload) -> (Verdict, Vec<Vec<u8>>) {
    let mut buf = vec![0u8; HEADROOM + input.len()];
    buf[HEADROOM..].copy_from_slice(input);
    let mut f = Frame::new(&mut buf, HEADROOM, input.len()).expect("fits");
    f.set_offload(offload);
    let v = process(&mut f, in_port, 0, t, st);
    let mut out = Vec::new();
    let sent = tx_segments(&f, |s| {
        assert!(s.len() <= SEGMENT_ROOM);
        out.push(s.to_vec());
        true
    });
    assert_ne!(sent, Sent::Unsegmentable);
    (v, out)
}

/// `input` cut in software first (complete checksums), each segment run
/// through the pipeline on its own: what a node without super-frames
/// makes of the same bytes.
fn run_segments(t: &Tables, st: &mut WorkerState, in_port: u16, input: &[u8]) -> (Vec<Verdict>, Vec<Vec<u8>>) {
    let l = Layout::of(input, 34).expect("layout");
    let mut segs = Vec::new();
    segment(input, &l, MSS, &mut [0u8; 2048], |s| segs.push(s.to_vec())).expect("cuts");
    let mut vs = Vec::new();
    let mut out = Vec::new();
    for s in segs {
        let (v, o) = run(t, st, in_port, &s, Offload::NONE);
        vs.push(v);
        out.extend(o);
    }
    (vs, out)
}

/// The same frames, or which differ where (the frames are too long to
/// print whole).
fn same(got: &[Vec<u8>], want: &[Vec<u8>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of frames");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let at = g.iter().zip(w.iter()).position(|(a, b)| a != b);
        assert!(
            g == w,
            "{what}: frame {i} differs (lengths {} and {}) first at byte {at:?}: {:?} vs {:?}",
            g.len(),
            w.len(),
            at.map(|a| &g[a.saturating_sub(4)..(a + 8).min(g.len())]),
            at.map(|a| &w[a.saturating_sub(4)..(a + 8).min(w.len())]),
        );
    }
}

/// Every TCP checksum in `frames` (inner, for VXLAN) verifies.
fn checksums_verify(frames: &[Vec<u8>]) {
    for f in frames {
        let at = if f[23] == 17 { 50 } else { 0 };
        let ip = &f[at + 14..];
        let tcp = &ip[20..usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
        let (s, d) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
        let sum = checksum::fold(checksum::sum(tcp, checksum::pseudo_header_v4(s, d, 6, tcp.len() as u16)));
        assert_eq!(sum, 0xffff, "TCP checksum of a segment");
        assert_eq!(checksum::fold(checksum::sum(&ip[..20], 0)), 0xffff, "IPv4 header checksum");
    }
}

#[test]
fn a_super_frame_across_the_overlay_is_one_encapsulation_and_its_segments_are_exact() {
    let t = mesh_tables("nat");
    let input = tcp(T2_MAC, T1_MAC, T1, T2, 40000, 5001, 5000, true);
    let (v, segs) = run(&t, &mut WorkerState::for_tables(&t), TASK1, &input, tso());
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert_eq!(segs.len(), 4, "5000 bytes in segments of {MSS}");
    let plain = tcp(T2_MAC, T1_MAC, T1, T2, 40000, 5001, 5000, false);
    let (vs, want) = run_segments(&t, &mut WorkerState::for_tables(&t), TASK1, &plain);
    assert!(vs.iter().all(|v| *v == Verdict::Tx(UPLINK)));
    same(&segs, &want, "the segments of one decision are the frames of four");
    checksums_verify(&segs);
}

#[test]
fn a_super_frame_through_the_routing_mesh_keeps_its_partial_checksum_right_through_the_nat() {
    for mode in ["nat", "preserve-source"] {
        let t = mesh_tables(mode);
        let (mut st, mut st_each) = (WorkerState::for_tables(&t), WorkerState::for_tables(&t));
        // The connection opens with a plain SYN (rr: T2 on node 2).
        let mut syn = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30080, 0, false);
        syn[47] = 0x02;
        assert!(syn_checksum(&mut syn));
        assert_eq!(run(&t, &mut st, UPLINK, &syn, Offload::NONE).0, Verdict::Tx(UPLINK), "{mode}");
        assert_eq!(run(&t, &mut st_each, UPLINK, &syn, Offload::NONE).0, Verdict::Tx(UPLINK));
        // Then the client's kernel sends a super-frame (a TAP uplink took
        // it): DNAT (and in nat mode SNAT) and VXLAN to node 2, once.
        let input = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30080, 4000, true);
        let (v, segs) = run(&t, &mut st, UPLINK, &input, tso());
        assert_eq!(v, Verdict::Tx(UPLINK), "{mode}");
        let plain = tcp(NODE1_MAC, CLIENT_MAC, CLIENT, NODE1, 40001, 30080, 4000, false);
        let (_, want) = run_segments(&t, &mut st_each, UPLINK, &plain);
        assert_eq!(segs.len(), 3);
        same(&segs, &want, &format!("{mode}: NAT on a partial checksum, then cut, equals cut, then NAT"));
        checksums_verify(&segs);
    }
}

/// Recomputes a frame's TCP checksum (after a flag change).
fn syn_checksum(f: &mut [u8]) -> bool {
    meshplane_dataplane::wire::rewrite::recompute_checksums_ipv4(&mut f[14..]).is_ok()
}

#[test]
fn a_tap_header_that_does_not_fit_its_frame_is_refused() {
    let frame = tcp(T2_MAC, T1_MAC, T1, T2, 40000, 5001, 3000, true);
    let hdr = |h: VirtioNetHdr| {
        let mut b = [0u8; HEADER_LEN_TUNNEL];
        h.emit_tunnel(None, &mut b);
        b
    };
    let good = VirtioNetHdr {
        flags: flags::NEEDS_CSUM,
        gso: GsoKind::TcpV4 { ecn: false },
        hdr_len: 54,
        gso_size: MSS,
        csum_start: 34,
        csum_offset: 16,
    };
    let accept = |vnet: usize, h: &[u8]| offload_of(vnet, h, &mut frame.clone());
    assert_eq!(accept(HEADER_LEN_V1, &hdr(good)), Some(tso()));
    assert_eq!(accept(HEADER_LEN_TUNNEL, &hdr(good)), Some(tso()));
    for (what, bad) in [
        ("segment size 0", VirtioNetHdr { gso_size: 0, ..good }),
        ("checksum field past the frame", VirtioNetHdr { csum_offset: 4000, ..good }),
        ("checksum not at the TCP header", VirtioNetHdr { csum_start: 30, ..good }),
        ("TSO6 was not offered", VirtioNetHdr { gso: GsoKind::TcpV6 { ecn: false }, ..good }),
        ("USO was not offered", VirtioNetHdr { gso: GsoKind::UdpL4, ..good }),
        ("a super-frame with a complete checksum", VirtioNetHdr { flags: 0, ..good }),
    ] {
        assert_eq!(accept(HEADER_LEN_V1, &hdr(bad)), None, "{what}");
    }
    let mut b = hdr(good);
    b[1] = 9;
    assert_eq!(accept(HEADER_LEN_V1, &b), None, "unknown GSO type");
    b[1] = 0x41;
    assert_eq!(accept(HEADER_LEN_TUNNEL, &b), None, "a tunnel over IPv6");
    b[1] = 0x21;
    assert_eq!(accept(HEADER_LEN_TUNNEL, &b), None, "a tunnel header on a frame that is not in VXLAN");
    // A single frame with a partial checksum is completed at once.
    let single = VirtioNetHdr { gso: GsoKind::None, gso_size: 0, ..good };
    let mut f = frame.clone();
    assert_eq!(offload_of(HEADER_LEN_V1, &hdr(single), &mut f), Some(Offload::NONE));
    checksums_verify(&[f]);
}

/// A jumbo underlay (9000; the network's MTU 8950): a super-frame with
/// segments of 8910 bytes of payload crosses as one decision, and cutting
/// it in software (a port without the offload) makes full-size jumbo
/// segments, each a 9014-byte VXLAN frame with its checksums right, not a
/// drop for want of room.
#[test]
fn a_jumbo_super_frame_is_cut_into_jumbo_segments() {
    let base = include_str!("../../examples/tables.toml").replace("underlay_mtu = 1500", "underlay_mtu = 9000");
    let t = Tables::compile(&toml::from_str::<TablesSpec>(&base).expect("spec")).expect("tables");
    assert_eq!(t.networks[0].mtu, 8950);
    let input = tcp(T2_MAC, T1_MAC, T1, T2, 40000, 5001, 20_000, true);
    let jumbo = Offload { gso_size: 8910, ..tso() };
    let (v, segs) = run(&t, &mut WorkerState::for_tables(&t), TASK1, &input, jumbo);
    assert_eq!(v, Verdict::Tx(UPLINK));
    let lens: Vec<usize> = segs.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![14 + 50 + 40 + 8910, 14 + 50 + 40 + 8910, 14 + 50 + 40 + 20_000 - 2 * 8910]);
    checksums_verify(&segs);
}
