//! Underlay frames through VXLAN classification and decapsulation: no panic;
//! the inner range lies inside the frame; and re-encapsulating the inner
//! frame gives a frame that classifies back to the same VNI and inner bytes.
#![no_main]

use core::net::Ipv4Addr;
use libfuzzer_sys::fuzz_target;
use meshplane_dataplane::wire::MacAddr;
use meshplane_dataplane::wire::parse_frame;
use meshplane_dataplane::wire::vxlan::{self, Classified, EncapParams, EncapTemplate};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fuzz_target!(|data: &[u8]| {
    let fast = vxlan::classify(data, LOCAL, vxlan::DEFAULT_PORT);
    assert_eq!(fast, vxlan::classify_general(data, LOCAL, vxlan::DEFAULT_PORT), "fast and general classify differ");
    let Ok(Classified::Vxlan(d)) = fast else { return };
    assert!(d.inner.start <= d.inner.end && d.inner.end <= data.len());
    assert!(d.vni <= vxlan::MAX_VNI);
    let inner = &data[d.inner.clone()];
    assert!(inner.len() >= 14);
    let _ = parse_frame(inner);

    let tpl = EncapTemplate::new(&EncapParams {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src_ip: d.outer_src,
        dst_ip: LOCAL,
        dst_port: vxlan::DEFAULT_PORT,
        vni: d.vni,
        ttl: 64,
    })
    .expect("a parsed VNI fits 24 bits");
    let mut buf = vec![0u8; vxlan::ENCAP_LEN + inner.len()];
    buf[vxlan::ENCAP_LEN..].copy_from_slice(inner);
    match tpl.write(&mut buf, vxlan::ENCAP_LEN, inner.len(), d.outer_src_port) {
        Ok(start) => {
            assert_eq!(start, 0);
            match vxlan::classify(&buf, LOCAL, vxlan::DEFAULT_PORT) {
                Ok(Classified::Vxlan(again)) => {
                    assert_eq!(again.vni, d.vni);
                    assert_eq!(again.outer_src, d.outer_src);
                    assert_eq!(again.outer_src_port, d.outer_src_port);
                    assert_eq!(&buf[again.inner], inner);
                }
                other => panic!("re-encapsulated frame did not classify: {other:?}"),
            }
        }
        // Only an inner frame too large for an IPv4 total length may fail.
        Err(e) => assert!(inner.len() + 36 > 65535, "{e}"),
    }
});
