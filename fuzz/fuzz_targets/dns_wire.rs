//! The embedded DNS's message handling over arbitrary bytes (the first
//! byte picks UDP or TCP, the rest is the message): `parse`, then a lookup
//! in a fixed view and `answer`; no panic, and every reply that is sent
//! (anything but `Ignore`) parses with hickory, carries the query's ID and
//! has QR set.
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use meshplane_dns::view::View;
use meshplane_dns::wire::{Parsed, answer, parse, servfail};
use meshplane_dns::zone::{Mode, NetZone, SvcRec, TaskRec};
use std::net::Ipv4Addr;
use std::sync::LazyLock;

static VIEW: LazyLock<View> = LazyLock::new(|| {
    let ip = |last| Ipv4Addr::new(198, 19, 0, last);
    let task = |name: &str, service: &str, last| TaskRec {
        name: name.into(),
        service: service.into(),
        ip: ip(last),
        serving: last % 2 == 1,
    };
    View::build(&NetZone {
        name: "app".into(),
        vni: 4096,
        gateway: ip(254),
        subnet: (ip(0), 24),
        internal: false,
        services: vec![
            SvcRec {
                name: "web".into(),
                mode: Mode::Vip,
                vip: Some(ip(2)),
                ports: vec![meshplane_dns::zone::SrvPort { port: 80, udp: false, target: 80 }],
            },
            SvcRec { name: "db".into(), mode: Mode::Dnsrr, vip: None, ports: vec![] },
        ],
        tasks: (0..120u8).map(|i| task(&format!("db.{i}"), "db", i + 3)).chain([task("web.1", "web", 200)]).collect(),
    })
});

fn check(reply: &[u8], id: u16) {
    let m = Message::from_vec(reply).expect("every reply parses");
    assert_eq!(m.metadata.id, id, "the query's ID");
    assert_eq!(m.metadata.message_type, MessageType::Response, "QR set");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else { return };
    let tcp = mode & 1 == 1;
    let id = msg.first_chunk::<2>().map(|b| u16::from_be_bytes(*b)).unwrap_or(0);
    match parse(msg, tcp) {
        Parsed::Ignore => {}
        Parsed::Reply(r) => check(&r, id),
        Parsed::Query(req) => {
            let found = VIEW.lookup(&req.name(), req.kind());
            let r = answer(&req, &found, u64::from(mode));
            check(&r, id);
            assert!(r.len() <= req.limit, "within the size limit");
            check(&servfail(&req), id);
        }
    }
});
