//! Differential: NAT rewrite with RFC 1624 incremental checksum updates must
//! give exactly the bytes of the same rewrite followed by a full
//! recomputation of every checksum.
//!
//! Input: 1 byte of flags (which fields to rewrite), 4+4 bytes of new
//! addresses, 2+2 bytes of new ports, then an IPv4 packet (checksums in it
//! are first made valid).
#![no_main]

use core::net::Ipv4Addr;
use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::wire::ipv4::Ipv4Packet;
use meshplane_dataplane::wire::rewrite::{Nat, recompute_checksums_ipv4, rewrite_ipv4, rewrite_ipv4_general};

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let (h, pkt) = data.split_at(13);
    let flags = h[0];
    let nat = Nat {
        src_addr: (flags & 1 != 0).then(|| Ipv4Addr::new(h[1], h[2], h[3], h[4])),
        dst_addr: (flags & 2 != 0).then(|| Ipv4Addr::new(h[5], h[6], h[7], h[8])),
        src_port: (flags & 4 != 0).then(|| u16::from_be_bytes([h[9], h[10]])),
        dst_port: (flags & 8 != 0).then(|| u16::from_be_bytes([h[11], h[12]])),
    };
    let mut before = pkt.to_vec();
    if recompute_checksums_ipv4(&mut before).is_err() {
        assert!(Ipv4Packet::new_checked(&before[..]).is_err());
        return;
    }
    let mut inc = before.clone();
    let result = rewrite_ipv4(&mut inc, &nat);
    let mut general = before.clone();
    assert_eq!(rewrite_ipv4_general(&mut general, &nat), result, "fast and general paths disagree");
    assert_eq!(inc, general, "fast and general paths wrote different bytes");
    match result {
        Ok(()) => {
            let mut full = inc.clone();
            recompute_checksums_ipv4(&mut full).expect("still a valid IPv4 packet");
            assert_eq!(inc, full, "incremental update differs from full recomputation");
            let p = Ipv4Packet::new_checked(&inc[..]).unwrap();
            assert!(p.verify_checksum());
            if let Some(a) = nat.src_addr {
                assert_eq!(p.src(), a);
            }
            if let Some(a) = nat.dst_addr {
                assert_eq!(p.dst(), a);
            }
        }
        Err(_) => assert_eq!(inc, before, "a refused rewrite writes nothing"),
    }
});
