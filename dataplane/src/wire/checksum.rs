//! The Internet checksum: full computation (RFC 1071) and incremental update
//! (RFC 1624).
//!
//! Sums are kept as `u32` accumulators of 16-bit big-endian words and folded
//! to 16 bits with end-around carry only at the end, so a caller can add the
//! pseudo-header, the header and the payload in any order.

use core::net::Ipv4Addr;

/// Adds `data` as big-endian 16-bit words to `acc` (an odd trailing byte is
/// padded with zero, RFC 1071 section 4.1). The result is not folded.
#[inline]
pub fn sum(data: &[u8], acc: u32) -> u32 {
    // Eight bytes at a time into a u64 so that carries never overflow for any
    // frame size a NIC can deliver (a u64 holds 2^32 words of 16 bits).
    let mut wide = u64::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        wide += (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for w in &mut rest {
        wide += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        wide += u64::from(*last) << 8;
    }
    fold64(wide)
}

/// Folds a 64-bit accumulator down to a value that fits in 32 bits without
/// changing its ones'-complement value.
#[inline]
fn fold64(mut v: u64) -> u32 {
    while v > 0xffff_ffff {
        v = (v & 0xffff_ffff) + (v >> 32);
    }
    v as u32
}

/// Folds an accumulator to 16 bits with end-around carry.
///
/// Two steps suffice for any `u32`, so there is no loop: after the first,
/// the value is at most 0xffff + 0xffff = 0x1fffe; after the second, at
/// most 0xffff.
#[inline]
pub fn fold(acc: u32) -> u16 {
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum field value for data whose unfolded sum is `acc`:
/// the ones' complement of the folded sum.
#[inline]
pub fn finish(acc: u32) -> u16 {
    !fold(acc)
}

/// RFC 1071 checksum of `data`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// Unfolded sum of the IPv4 pseudo-header (RFC 793 / RFC 768): source,
/// destination, zero, protocol, transport length.
#[inline]
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u32::from(u16::from_be_bytes([s[0], s[1]]))
        + u32::from(u16::from_be_bytes([s[2], s[3]]))
        + u32::from(u16::from_be_bytes([d[0], d[1]]))
        + u32::from(u16::from_be_bytes([d[2], d[3]]))
        + u32::from(protocol)
        + u32::from(length)
}

/// Unfolded sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
#[inline]
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, length: u32) -> u32 {
    let acc = sum(src, 0);
    let acc = sum(dst, acc);
    fold64(u64::from(acc) + u64::from(length >> 16) + u64::from(length & 0xffff) + u64::from(next_header))
}

/// RFC 1624 equation 3: the new checksum after one 16-bit word of the
/// covered data changed from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!csum) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// RFC 1624 update for a 32-bit field (an IPv4 address) that changed.
#[inline]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let acc =
        u32::from(!csum) + u32::from(!(old >> 16) as u16) + u32::from(!(old as u16)) + (new >> 16) + (new & 0xffff);
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of RFC 1071 section 3.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn fold_is_exact_at_the_edges() {
        // Reference: repeated end-around carry.
        let slow = |mut a: u32| {
            while a > 0xffff {
                a = (a & 0xffff) + (a >> 16);
            }
            a as u16
        };
        for a in [0, 1, 0xffff, 0x1_0000, 0x1_fffe, 0x1_ffff, 0xffff_0000, 0xffff_fffe, u32::MAX] {
            assert_eq!(fold(a), slow(a), "{a:#x}");
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0xab], 0), 0xab00);
        assert_eq!(sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn sum_of_data_with_its_checksum_is_all_ones() {
        // The IPv4 header used as the worked example on Wikipedia's
        // "Internet checksum" page; its checksum is 0xb861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        let mut copy = hdr;
        copy[10] = 0;
        copy[11] = 0;
        assert_eq!(checksum(&copy), u16::from_be_bytes([hdr[10], hdr[11]]));
        assert_eq!(fold(sum(&hdr, 0)), 0xffff);
    }

    #[test]
    fn incremental_matches_full_for_a_word_change() {
        let mut hdr = [
            0x45u8, 0x00, 0x00, 0x54, 0x8a, 0x5d, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 0xc6, 0x13, 0x00, 0x01, 0xc6,
            0x13, 0x00, 0x02,
        ];
        let c0 = checksum(&hdr);
        // TTL 64 -> 63 changes the word (ttl, proto).
        let old = u16::from_be_bytes([hdr[8], hdr[9]]);
        hdr[8] = 63;
        let new = u16::from_be_bytes([hdr[8], hdr[9]]);
        assert_eq!(update16(c0, old, new), checksum(&hdr));
    }

    #[test]
    fn rfc1624_negative_zero_case() {
        // RFC 1624 section 4 shows equation 2 giving 0x0000 where 0xFFFF is
        // right; equation 3 must give the same answer as recomputation.
        // Data whose checksum is 0xFFFF is impossible, so start from a header
        // whose checksum is 0x0000 (sum 0xFFFF) and change a word so that
        // the new sum is again 0xFFFF.
        let a = [0xffu8, 0xfe, 0x00, 0x01];
        assert_eq!(checksum(&a), 0x0000);
        let b = [0xffu8, 0xfd, 0x00, 0x02];
        assert_eq!(checksum(&b), 0x0000);
        assert_eq!(update16(update16(0x0000, 0xfffe, 0xfffd), 0x0001, 0x0002), 0x0000);
    }

    #[test]
    fn update32_equals_two_update16() {
        let c = 0x1234;
        let (old, new) = (0xc613_0001u32, 0xc612_0a0bu32);
        let two = update16(update16(c, (old >> 16) as u16, (new >> 16) as u16), old as u16, new as u16);
        assert_eq!(update32(c, old, new), two);
    }
}
