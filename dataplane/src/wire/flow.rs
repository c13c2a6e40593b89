//! Flow hashing: a deterministic hash of a frame's flow identity, used for
//! the VXLAN outer source port (RFC 7348 section 5) and, later, for Maglev.
//!
//! The hash is seeded and deterministic across processes and machines (no
//! per-process random keys), so every node maps a flow the same way.

use super::ethernet::{EthernetFrame, ethertype};
use super::ipv4::{Ipv4Packet, protocol};
use super::ipv6::Ipv6Packet;

/// Default seed.
pub const DEFAULT_SEED: u64 = 0x6d65_7368_706c_616e; // "meshplan"

/// Folded multiply: the full 128-bit product of two words, its halves
/// XORed. Every input bit reaches every output bit; one `mul` instruction.
#[inline(always)]
fn folded_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Hashes two 64-bit words with a seed: two dependent folded multiplies
/// (the construction of foldhash/wyhash). Deterministic everywhere.
#[inline]
pub fn hash2(seed: u64, a: u64, b: u64) -> u32 {
    const K1: u64 = 0x243f_6a88_85a3_08d3; // digits of pi: nothing up the sleeve
    const K2: u64 = 0x1319_8a2e_0370_7344;
    const K3: u64 = 0xa409_3822_299f_31d0;
    let h = folded_mul(a ^ seed ^ K1, b ^ K2);
    (folded_mul(h ^ seed, K3) >> 32) as u32
}

#[inline]
fn ports(l4: &[u8], proto: u8) -> u64 {
    match proto {
        protocol::TCP | protocol::UDP if l4.len() >= 4 => u64::from(u32::from_be_bytes([l4[0], l4[1], l4[2], l4[3]])),
        _ => 0,
    }
}

/// Hash of the flow a frame belongs to: the IPv4 or IPv6 5-tuple (3-tuple for
/// fragments and protocols without ports), or the MAC addresses and EtherType
/// for anything else. Never fails: unparseable frames hash their first bytes.
#[inline]
pub fn flow_hash(frame: &[u8]) -> u32 {
    flow_hash_seeded(DEFAULT_SEED, frame)
}

/// [`flow_hash`] with an explicit seed.
///
/// Untagged IPv4 without options is read at fixed offsets; everything else
/// goes through the checked views, with the same result for the same flow.
#[inline]
pub fn flow_hash_seeded(seed: u64, frame: &[u8]) -> u32 {
    if let Some(h) = frame.first_chunk::<38>()
        && h[12] == 0x08
        && h[13] == 0x00
        && h[14] == 0x45
    {
        let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
        if total >= 24 && total + 14 <= frame.len() {
            let addrs = u64::from_be_bytes([h[26], h[27], h[28], h[29], h[30], h[31], h[32], h[33]]);
            let proto = h[23];
            let fragment = h[20] & 0x3f != 0 || h[21] != 0;
            let p = match proto {
                protocol::TCP | protocol::UDP if !fragment => {
                    u64::from(u32::from_be_bytes([h[34], h[35], h[36], h[37]]))
                }
                _ => 0,
            };
            return hash2(seed, addrs, (p << 8) | u64::from(proto));
        }
    }
    flow_hash_general(seed, frame)
}

/// [`flow_hash_seeded`] of an untagged IPv4 frame without options whose
/// total length is at least 24 and within the frame: the caller has checked
/// that (the overlay's fast path has, so it hashes without re-parsing).
#[inline(always)]
pub fn hash_ipv4_at_fixed_offsets(seed: u64, h: &[u8; 38]) -> u32 {
    let addrs = u64::from_be_bytes([h[26], h[27], h[28], h[29], h[30], h[31], h[32], h[33]]);
    let proto = h[23];
    let fragment = h[20] & 0x3f != 0 || h[21] != 0;
    let p = match proto {
        protocol::TCP | protocol::UDP if !fragment => u64::from(u32::from_be_bytes([h[34], h[35], h[36], h[37]])),
        _ => 0,
    };
    hash2(seed, addrs, (p << 8) | u64::from(proto))
}

/// [`flow_hash_seeded`] through the checked views only: the reference the
/// fast path is fuzzed against.
pub fn flow_hash_general(seed: u64, frame: &[u8]) -> u32 {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        let mut w = [0u8; 16];
        let n = frame.len().min(16);
        w[..n].copy_from_slice(&frame[..n]);
        let (a, b) = w.split_at(8);
        return hash2(
            seed,
            u64::from_le_bytes(a.try_into().unwrap_or([0; 8])),
            u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
        );
    };
    match eth.ethertype() {
        ethertype::IPV4 => {
            if let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) {
                let addrs = (u64::from(u32::from(ip.src())) << 32) | u64::from(u32::from(ip.dst()));
                let p = if ip.is_fragment() { 0 } else { ports(ip.payload(), ip.protocol()) };
                return hash2(seed, addrs, (p << 8) | u64::from(ip.protocol()));
            }
        }
        ethertype::IPV6 => {
            if let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) {
                let (s, d) = (u128::from(ip.src()), u128::from(ip.dst()));
                let folded =
                    (s as u64) ^ ((s >> 64) as u64) ^ (d as u64).rotate_left(17) ^ ((d >> 64) as u64).rotate_left(41);
                let (proto, p) = match ip.transport() {
                    Ok(t) if !t.fragmented => (t.protocol, ports(ip.from_offset(t.offset), t.protocol)),
                    Ok(t) => (t.protocol, 0),
                    Err(_) => (ip.next_header(), 0),
                };
                return hash2(seed, folded, (p << 8) | u64::from(proto));
            }
        }
        _ => {}
    }
    let (d, s) = (eth.dst().0, eth.src().0);
    let a = u64::from_be_bytes([0, 0, d[0], d[1], d[2], d[3], d[4], d[5]]);
    let b = u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], 0, 0]) | u64::from(eth.ethertype());
    hash2(seed, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(sport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
            .udp(sport, 53)
            .write(&mut f, b"x")
            .unwrap();
        f
    }

    #[test]
    fn same_flow_same_hash_different_flow_different_hash() {
        assert_eq!(flow_hash(&udp_frame(1000)), flow_hash(&udp_frame(1000)));
        assert_ne!(flow_hash(&udp_frame(1000)), flow_hash(&udp_frame(1001)));
        // The payload and MACs do not matter for IP flows.
        let mut other = udp_frame(1000);
        other[0] = 0x0a;
        *other.last_mut().unwrap() = b'y';
        assert_eq!(flow_hash(&other), flow_hash(&udp_frame(1000)));
        assert_ne!(flow_hash_seeded(1, &udp_frame(1000)), flow_hash_seeded(2, &udp_frame(1000)));
    }

    #[test]
    fn source_ports_spread() {
        let mut seen = std::collections::HashSet::new();
        for p in 0..1000u16 {
            seen.insert(super::super::vxlan::src_port_for_hash(flow_hash(&udp_frame(p))));
        }
        assert!(seen.len() > 950, "{} distinct ports of 1000 flows", seen.len());
    }

    #[test]
    fn fast_and_general_paths_agree() {
        let mut opts = udp_frame(7);
        assert_eq!(flow_hash(&opts), flow_hash_general(DEFAULT_SEED, &opts));
        // The same flow with IPv4 options takes the general path.
        opts.splice(34..34, [1u8, 1, 1, 0]);
        opts[14] = 0x46;
        let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
        opts[16..18].copy_from_slice(&total.to_be_bytes());
        assert_eq!(flow_hash(&opts), flow_hash(&udp_frame(7)));
    }

    #[test]
    fn garbage_hashes_without_panicking() {
        for n in 0..64 {
            let _ = flow_hash(&vec![0x45; n]);
        }
    }
}
