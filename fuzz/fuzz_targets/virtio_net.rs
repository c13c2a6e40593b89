//! A virtio-net header and the frame behind it, as a TAP with
//! `IFF_VNET_HDR` hands them over: no panic; a header that parses emits the
//! same bytes back (for the fields it keeps); a header the frame passes
//! `check` with can have its partial checksum completed, after which the
//! covered bytes and the pseudo-header sum that was in the field add up to
//! zero (RFC 1071), and a header the frame fails leaves the frame alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::wire::checksum;
use meshplane_dataplane::wire::virtio_net::{HEADER_LEN, VirtioNetHdr, complete_checksum};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = VirtioNetHdr::parse(data) else { return };
    let mut back = [0u8; HEADER_LEN];
    h.emit(&mut back);
    assert_eq!(VirtioNetHdr::parse(&back), Ok(h), "emit and parse disagree");
    let mut frame = data[HEADER_LEN..].to_vec();
    let before = frame.clone();
    if h.check(frame.len()).is_err() {
        assert!(complete_checksum(&mut frame, &h).is_err());
        assert_eq!(frame, before, "a refused header changed the frame");
        return;
    }
    complete_checksum(&mut frame, &h).expect("a checked header completes");
    if !h.needs_csum() {
        assert_eq!(frame, before);
        return;
    }
    let (start, at) = (usize::from(h.csum_start), usize::from(h.csum_start) + usize::from(h.csum_offset));
    let pseudo = u16::from_be_bytes([before[at], before[at + 1]]);
    let total = checksum::fold(checksum::sum(&frame[start..], u32::from(pseudo)));
    assert!(total == 0xffff || total == 0, "completed checksum does not verify: {total:#x}");
});
