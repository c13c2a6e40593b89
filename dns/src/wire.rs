//! DNS messages: a query parsed defensively (every count checked against
//! the bytes left before anything is allocated for it: hickory's
//! `Message::read` reserves room for the whole question count first), and
//! the answers built with hickory-proto. Nothing here panics on any input.

use crate::TTL;
use crate::view::{Kind, Lookup};
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// The largest UDP answer (the DNS Flag Day 2020 value), and the EDNS
/// payload size we announce.
pub const UDP_MAX: u16 = 1232;
/// The smallest a resource record can be on the wire (root name, type,
/// class, TTL, RDLENGTH 0).
const MIN_RR: usize = 11;

/// A query worth answering.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its ID.
    pub id: u16,
    /// Recursion desired.
    pub rd: bool,
    /// The question.
    pub query: Query,
    /// Its EDNS, if it had one.
    pub edns: Option<Edns>,
    /// How large the answer may be (UDP: 512, or the client's EDNS size up
    /// to [`UDP_MAX`]; TCP: 65 535).
    pub limit: usize,
}

impl Request {
    /// The record type asked, as the view tells them apart.
    pub fn kind(&self) -> Kind {
        match self.query.query_type() {
            RecordType::A => Kind::A,
            RecordType::PTR => Kind::Ptr,
            RecordType::SRV => Kind::Srv,
            _ => Kind::Other,
        }
    }

    /// The name asked, as sent.
    pub fn name(&self) -> String {
        self.query.name().to_ascii()
    }
}

/// What a received message is.
#[derive(Debug)]
pub enum Parsed {
    /// A query to answer.
    Query(Request),
    /// A refusal to send back as it is (FORMERR, NOTIMP, REFUSED,
    /// BADVERS).
    Reply(Vec<u8>),
    /// Nothing to answer (too short to have an ID, or itself a response).
    Ignore,
}

/// Reads a query (`tcp`: it came over TCP, without its length prefix).
pub fn parse(buf: &[u8], tcp: bool) -> Parsed {
    let Some(&[h0, h1, flags, ..]) = buf.first_chunk::<12>() else { return Parsed::Ignore };
    let id = u16::from_be_bytes([h0, h1]);
    let mut dec = BinDecoder::new(buf);
    let Ok(h) = Header::read(&mut dec) else { return Parsed::Ignore };
    if h.metadata.message_type == MessageType::Response || flags & 0x80 != 0 {
        return Parsed::Ignore;
    }
    let op = h.metadata.op_code;
    if op != OpCode::Query {
        return Parsed::Reply(refusal(id, op, ResponseCode::NotImp, false));
    }
    let formerr = || Parsed::Reply(refusal(id, op, ResponseCode::FormErr, false));
    let c = h.counts;
    let room = buf.len().saturating_sub(12) / MIN_RR;
    if c.queries != 1 || [c.answers, c.authorities, c.additionals].iter().any(|&n| usize::from(n) > room) {
        return formerr();
    }
    let Ok(query) = Query::read(&mut dec) else { return formerr() };
    let mut edns = None;
    for (count, additional) in [(c.answers, false), (c.authorities, false), (c.additionals, true)] {
        match Message::read_records(&mut dec, usize::from(count), additional, OpCode::Query) {
            Ok((_, e, _)) => edns = edns.or(e),
            Err(_) => return formerr(),
        }
    }
    if !dec.is_empty() {
        return formerr();
    }
    if query.query_class() != DNSClass::IN {
        return Parsed::Reply(refusal(id, op, ResponseCode::Refused, edns.is_some()));
    }
    if edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Parsed::Reply(refusal(id, op, ResponseCode::BADVERS, true));
    }
    let limit = if tcp {
        usize::from(u16::MAX)
    } else {
        usize::from(edns.as_ref().map_or(512, |e| e.max_payload().clamp(512, UDP_MAX)))
    };
    Parsed::Query(Request { id, rd: h.metadata.recursion_desired, query, edns, limit })
}

/// A refusal without a question (we may not have one), as BIND sends it;
/// with an OPT record if `edns`.
fn refusal(id: u16, op: OpCode, code: ResponseCode, edns: bool) -> Vec<u8> {
    let mut m = Message::error_msg(id, op, code);
    if edns {
        m.set_edns(our_edns());
    }
    m.to_vec().unwrap_or_default()
}

fn our_edns() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(UDP_MAX);
    e
}

/// The answer to `req` from what the view found (`NotOurs` is the
/// forwarder's: answered SERVFAIL here). Addresses are shuffled with
/// `seed`. Over the request's size limit, records are dropped from the end
/// and TC set (the client asks again over TCP).
pub fn answer(req: &Request, found: &Lookup, seed: u64) -> Vec<u8> {
    let mut m = Message::response(req.id, OpCode::Query);
    m.metadata.recursion_desired = req.rd;
    m.metadata.recursion_available = true;
    m.add_query(req.query.clone());
    if req.edns.is_some() {
        m.set_edns(our_edns());
    }
    let owner: Name = req.query.name().clone();
    match found {
        Lookup::A(ips) => {
            let mut ips = ips.clone();
            shuffle(&mut ips, seed);
            for ip in ips {
                m.add_answer(Record::from_rdata(owner.clone(), TTL, RData::A(A(ip))));
            }
        }
        Lookup::Ptr(target) => match Name::from_ascii(target) {
            Ok(n) => {
                m.add_answer(Record::from_rdata(owner, TTL, RData::PTR(PTR(n))));
            }
            Err(_) => m.metadata.response_code = ResponseCode::ServFail,
        },
        Lookup::Srv(recs) => {
            // Swarm's shape: priority 0, weight 1, the task's name, and
            // its address in the additional section (in the same order).
            let mut recs = recs.clone();
            shuffle(&mut recs, seed);
            for (port, target, ip) in recs {
                let Ok(n) = Name::from_ascii(&target) else { continue };
                m.add_answer(Record::from_rdata(owner.clone(), TTL, RData::SRV(SRV::new(0, 1, port, n.clone()))));
                m.add_additional(Record::from_rdata(n, TTL, RData::A(A(ip))));
            }
        }
        Lookup::NoData => {}
        Lookup::NxDomain => m.metadata.response_code = ResponseCode::NXDomain,
        Lookup::NotOurs => m.metadata.response_code = ResponseCode::ServFail,
    }
    encode(m, req.limit)
}

/// SERVFAIL for `req` (a forward that failed or was not allowed).
pub fn servfail(req: &Request) -> Vec<u8> {
    answer(req, &Lookup::NotOurs, 0)
}

/// `m` encoded within `limit` bytes: additional records dropped first
/// (an SRV answer's addresses), then answers from the end, with TC set,
/// until it fits. What is kept is a prefix of the answers followed by the
/// additionals; the longest that fits is found by bisection, so a service
/// of thousands of tasks costs a few encodings, not one per record
/// dropped (which a task asking for `tasks.SVC` could turn into seconds
/// of the node's DNS thread).
fn encode(mut m: Message, limit: usize) -> Vec<u8> {
    let out = m.to_vec().unwrap_or_default();
    let total = m.answers.len() + m.additionals.len();
    if out.len() <= limit || total == 0 {
        return out;
    }
    let (answers, additionals) = (std::mem::take(&mut m.answers), std::mem::take(&mut m.additionals));
    m.metadata.truncation = true;
    let keep = |k: usize| {
        let mut t = m.clone();
        t.answers.extend(answers.iter().take(k).cloned());
        t.additionals.extend(additionals.iter().take(k.saturating_sub(answers.len())).cloned());
        t.to_vec().unwrap_or_default()
    };
    // keep(lo) fits (or lo is 0); keep(hi) does not. A record takes at
    // least 11 bytes, so no more than limit / 11 of them fit.
    let (mut lo, mut hi) = (0, total.min(limit / 11 + 1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if keep(mid).len() <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    keep(lo)
}

/// Fisher-Yates with a xorshift generator seeded by `seed`.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn rcode(b: &[u8]) -> u8 {
        b[3] & 0x0f
    }

    #[test]
    fn srv_answers_name_the_tasks_with_their_addresses_additional_and_truncate_those_first() {
        let Parsed::Query(req) = parse(&query("_80._tcp.web.", RecordType::SRV, false), false) else {
            panic!("a query")
        };
        assert_eq!(req.kind(), Kind::Srv);
        let recs: Vec<(u16, String, Ipv4Addr)> =
            (1..=2).map(|i| (8080, format!("web.{i}.app."), Ipv4Addr::new(198, 19, 0, i))).collect();
        let m = Message::from_vec(&answer(&req, &Lookup::Srv(recs), 7)).unwrap();
        let mut got: Vec<(u16, u16, u16, String, u32)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(v) => (v.priority, v.weight, v.port, v.target.to_ascii(), r.ttl),
                d => panic!("not SRV: {d:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(got, [(0, 1, 8080, "web.1.app.".into(), 600), (0, 1, 8080, "web.2.app.".into(), 600)]);
        let mut extra: Vec<(String, RData)> =
            m.additionals.iter().map(|r| (r.name.to_ascii(), r.data.clone())).collect();
        extra.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            extra,
            [
                ("web.1.app.".into(), RData::A(A(Ipv4Addr::new(198, 19, 0, 1)))),
                ("web.2.app.".into(), RData::A(A(Ipv4Addr::new(198, 19, 0, 2))))
            ]
        );
        // Too many for 512 bytes: the addresses go first, then records, TC set.
        let many: Vec<(u16, String, Ipv4Addr)> =
            (1..=30).map(|i| (8080, format!("web.{i}.app."), Ipv4Addr::new(198, 19, 0, i))).collect();
        let out = answer(&req, &Lookup::Srv(many), 7);
        let m = Message::from_vec(&out).unwrap();
        assert!(out.len() <= 512 && m.metadata.truncation, "{} bytes", out.len());
        assert!(m.additionals.is_empty() && !m.answers.is_empty());
    }

    #[test]
    fn a_query_is_answered_with_every_address_in_a_shuffled_order() {
        let Parsed::Query(req) = parse(&query("tasks.web.", RecordType::A, false), false) else { panic!("a query") };
        assert_eq!((req.id, req.kind(), req.name().as_str(), req.limit), (0x1234, Kind::A, "tasks.web.", 512));
        let ips: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(198, 19, 0, i)).collect();
        let orders: std::collections::BTreeSet<Vec<Ipv4Addr>> = (0..20)
            .map(|seed| {
                let m = Message::from_vec(&answer(&req, &Lookup::A(ips.clone()), seed)).unwrap();
                assert_eq!(
                    (m.metadata.id, m.metadata.response_code, m.queries.len()),
                    (0x1234, ResponseCode::NoError, 1)
                );
                assert!(m.metadata.recursion_available && m.metadata.recursion_desired);
                assert!(m.answers.iter().all(|r| r.ttl == TTL));
                let mut got: Vec<Ipv4Addr> = m
                    .answers
                    .iter()
                    .map(|r| match &r.data {
                        RData::A(a) => a.0,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                let order = got.clone();
                got.sort();
                assert_eq!(got, ips, "every address, once");
                order
            })
            .collect();
        assert!(orders.len() > 1, "shuffled");
    }

    #[test]
    fn nodata_nxdomain_ptr_and_edns() {
        let Parsed::Query(req) = parse(&query("web.", RecordType::AAAA, true), false) else { panic!() };
        assert_eq!((req.kind(), req.limit), (Kind::Other, usize::from(UDP_MAX)), "EDNS 4096 capped at 1232");
        let m = Message::from_vec(&answer(&req, &Lookup::NoData, 1)).unwrap();
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(m.edns.map(|e| e.max_payload()), Some(UDP_MAX));
        let Parsed::Query(req) = parse(&query("77.0.19.198.in-addr.arpa.", RecordType::PTR, false), false) else {
            panic!()
        };
        assert_eq!(rcode(&answer(&req, &Lookup::NxDomain, 1)), 3);
        let m = Message::from_vec(&answer(&req, &Lookup::Ptr("web.2.app.".into()), 1)).unwrap();
        assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "web.2.app."));
        assert_eq!(rcode(&servfail(&req)), 2);
    }

    #[test]
    fn too_many_addresses_for_udp_are_truncated_and_tc_set() {
        let Parsed::Query(req) = parse(&query("db.", RecordType::A, false), false) else { panic!() };
        let ips: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        let out = answer(&req, &Lookup::A(ips.clone()), 3);
        assert!(out.len() <= 512);
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation && !m.answers.is_empty() && m.answers.len() < 100);
        let Parsed::Query(tcp) = parse(&query("db.", RecordType::A, false), true) else { panic!() };
        let m = Message::from_vec(&answer(&tcp, &Lookup::A(ips), 3)).unwrap();
        assert!(!m.metadata.truncation && m.answers.len() == 100, "TCP carries them all");
    }

    /// Twenty thousand tasks over UDP: as many as fit, no fewer (one more
    /// would not fit). Over TCP hickory's encoder itself stops at 64 KiB:
    /// a whole message of as many records as that holds.
    #[test]
    fn a_huge_answer_keeps_the_longest_prefix_that_fits() {
        let ips: Vec<Ipv4Addr> = (0..20_000u32).map(|i| Ipv4Addr::from(0xc613_0000 + i)).collect();
        let Parsed::Query(req) = parse(&query("tasks.big.", RecordType::A, false), false) else { panic!() };
        let out = answer(&req, &Lookup::A(ips.clone()), 5);
        let m = Message::from_vec(&out).unwrap();
        assert!(out.len() <= 512 && m.metadata.truncation && !m.answers.is_empty(), "{} bytes", out.len());
        let mut more = m.clone();
        more.add_answer(m.answers[0].clone());
        assert!(more.to_vec().unwrap().len() > 512, "{} records kept, one more fits", m.answers.len());
        let Parsed::Query(tcp) = parse(&query("tasks.big.", RecordType::A, false), true) else { panic!() };
        let out = answer(&tcp, &Lookup::A(ips), 5);
        let m = Message::from_vec(&out).unwrap();
        assert!(out.len() <= 65_535 && m.answers.len() > 2_000, "{} bytes, {} records", out.len(), m.answers.len());
    }

    #[test]
    fn malformed_queries_get_formerr_and_never_a_panic() {
        let good = query("web.", RecordType::A, false);
        let formerr = |b: &[u8]| match parse(b, false) {
            Parsed::Reply(r) => rcode(&r) == 1 && r[..2] == b[..2],
            _ => false,
        };
        // Truncated in the question.
        assert!(formerr(&good[..good.len() - 3]));
        // Zero questions, two questions, a huge answer count.
        for (at, v) in [(5, 0u8), (5, 2), (7, 0xff)] {
            let mut b = good.clone();
            b[at] = v;
            if at == 7 {
                b[6] = 0xff;
            }
            assert!(formerr(&b), "count byte {at} = {v}");
        }
        // A compression loop: the question's name points at itself.
        let mut lp = good[..12].to_vec();
        lp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(formerr(&lp));
        // Bytes after the last record.
        let mut extra = good.clone();
        extra.push(0);
        assert!(formerr(&extra));
        // Too short to answer, a response, another opcode, another class.
        assert!(matches!(parse(&good[..11], false), Parsed::Ignore));
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert!(matches!(parse(&resp, false), Parsed::Ignore));
        let mut notify = good.clone();
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        assert!(matches!(parse(&notify, false), Parsed::Reply(r) if rcode(&r) == 4));
        let mut chaos = good.clone();
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert!(matches!(parse(&chaos, false), Parsed::Reply(r) if rcode(&r) == 5));
        // Every prefix and every single-byte change of a good query: no panic.
        for i in 0..good.len() {
            let _ = parse(&good[..i], false);
            for v in [0u8, 0x3f, 0xc0, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = parse(&b, i % 2 == 0);
            }
        }
    }
}
