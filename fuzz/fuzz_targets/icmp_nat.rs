//! The ICMP NAT of egress (`wire::icmp_nat`): reading the quote of an ICMP
//! error, translating it, echo identifiers and the TTL, on any bytes.
//!
//! Input: 1 byte of flags (which side of the quote to rewrite), 4 bytes of
//! a new address, 2 of a new port, then an IPv4 packet (its outer
//! checksums are first made valid). Properties: nothing panics; a refused
//! rewrite writes nothing; an accepted one leaves the outer IPv4 and the
//! ICMP checksums valid, the quoted header's checksum as valid as it was,
//! and the quote reading back as written.
#![no_main]

use core::net::Ipv4Addr;
use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::wire::checksum::checksum;
use meshplane_dataplane::wire::icmp_nat::{dec_ttl, echo_id, quote, rewrite_echo, rewrite_error};
use meshplane_dataplane::wire::icmpv4::Icmpv4Packet;
use meshplane_dataplane::wire::ipv4::Ipv4Packet;
use meshplane_dataplane::wire::rewrite::Nat;

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let (h, pkt) = data.split_at(7);
    let addr = Ipv4Addr::new(h[1], h[2], h[3], h[4]);
    let port = u16::from_be_bytes([h[5], h[6]]);
    let mut before = pkt.to_vec();
    {
        let Ok(mut p) = Ipv4Packet::new_checked(&mut before[..]) else { return };
        p.fill_checksum();
    }
    let total = Ipv4Packet::new_checked(&before[..]).map(|p| p.total_len()).unwrap_or(0);
    let hl = usize::from(before[0] & 0x0f) * 4;
    let outer_ok = |p: &[u8]| Ipv4Packet::new_checked(p).is_ok_and(|p| p.verify_checksum());

    // The TTL.
    let mut t = before.clone();
    if dec_ttl(&mut t).is_ok() {
        assert!(outer_ok(&t), "TTL − 1 keeps the header checksum valid");
    }

    // Echo identifiers.
    let mut e = before.clone();
    let nat = Nat { dst_addr: Some(addr), ..Nat::default() };
    match rewrite_echo(&mut e, &nat, port) {
        Ok(()) => {
            assert!(outer_ok(&e));
            assert_eq!(echo_id(&e).map(|(_, id)| id), Ok(port));
            let icmp_valid = |p: &[u8]| Icmpv4Packet::new_checked(&p[hl..total]).is_ok_and(|i| i.verify_checksum());
            // (A message whose words but the checksum are all zero sums to
            // +0, which RFC 1624's update cannot tell from −0: before or
            // after. Any other message's validity is kept.)
            let zero = |p: &[u8]| p[hl..total].iter().enumerate().all(|(i, &b)| b == 0 || (2..4).contains(&i));
            if !zero(&before) && !zero(&e) {
                assert_eq!(icmp_valid(&e), icmp_valid(&before), "the ICMP checksum stays as valid as it was");
            }
        }
        Err(_) => assert_eq!(e, before, "a refused rewrite writes nothing"),
    }

    // Errors and their quotes.
    let Ok(q) = quote(&before) else { return };
    let inner_valid = |p: &[u8]| checksum(&p[q.at..q.at + q.ihl]) == 0;
    let mut r = before.clone();
    let (src, dst) = if h[0] & 1 == 0 { (Some((addr, port)), None) } else { (None, Some((addr, port))) };
    let outer =
        Nat { src_addr: (h[0] & 2 != 0).then_some(addr), dst_addr: (h[0] & 4 != 0).then_some(addr), ..Nat::default() };
    match rewrite_error(&mut r, &q, &outer, src, dst) {
        Ok(()) => {
            assert!(outer_ok(&r), "the outer header checksum");
            assert!(Icmpv4Packet::new_checked(&r[hl..total]).is_ok_and(|i| i.verify_checksum()), "the ICMP checksum");
            assert_eq!(inner_valid(&r), inner_valid(&before), "the quoted header's checksum");
            let back = quote(&r).expect("still a quote");
            if let Some((a, p)) = src {
                assert_eq!((back.src, back.sport), (a, p));
            }
            if let Some((a, p)) = dst {
                assert_eq!(back.dst, a);
                if q.proto != 1 {
                    assert_eq!(back.dport, p);
                }
            }
        }
        Err(_) => assert_eq!(r, before, "a refused rewrite writes nothing"),
    }
});
