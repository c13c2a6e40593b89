//! One network's names as lookup maps, built off the packet path from its
//! [`NetZone`], and the name rules of
//! `docs/dns-design.md` section 3: `SERVICE` (its VIP, or its serving tasks
//! in dnsrr mode), `tasks.SERVICE`, `TASK`, each also with the network's
//! name appended, and PTR for VIPs and tasks. Names are matched without
//! regard to case.

use crate::zone::{Mode, NetZone};
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What a name is in a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Its addresses (in the zone's order; the answer shuffles them).
    A(Vec<Ipv4Addr>),
    /// A reverse name: the name it points to (`NAME.NETWORK.`).
    Ptr(String),
    /// Service records: each serving task's port, name (`TASK.NETWORK.`)
    /// and address (in the zone's order; the answer shuffles them).
    Srv(Vec<(u16, String, Ipv4Addr)>),
    /// A name of ours without records of the type asked (NOERROR, no
    /// answer: never forwarded).
    NoData,
    /// In the reverse space of the network's subnet, but no one's.
    NxDomain,
    /// Not a name of this network (the forwarder's).
    NotOurs,
}

/// The record types [`View::lookup`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// IPv4 address.
    A,
    /// Reverse.
    Ptr,
    /// Service records.
    Srv,
    /// Anything else.
    Other,
}

/// One network's lookup maps.
#[derive(Debug, Clone, Default)]
pub struct View {
    network: String,
    subnet: (u32, u32),
    /// Lower-case name (without the network suffix) → addresses.
    names: HashMap<String, Vec<Ipv4Addr>>,
    /// Address → `NAME.NETWORK.`.
    reverse: HashMap<Ipv4Addr, String>,
    /// Lower-case `_port._proto.service` → its records.
    srv: HashMap<String, Vec<(u16, String, Ipv4Addr)>>,
    internal: bool,
}

impl View {
    /// The maps of network `z`. A service's names (its own and its
    /// `tasks.` name) win over a task's of the same spelling: a task, which
    /// a worker may attach about itself, cannot take a service's name.
    pub fn build(z: &NetZone) -> View {
        let mask = if z.subnet.1 == 0 { 0 } else { u32::MAX << (32 - u32::from(z.subnet.1.min(32))) };
        let mut v = View {
            network: z.name.to_ascii_lowercase(),
            subnet: (u32::from(z.subnet.0) & mask, mask),
            internal: z.internal,
            ..View::default()
        };
        for s in &z.services {
            let name = s.name.to_ascii_lowercase();
            let serving: Vec<Ipv4Addr> =
                z.tasks.iter().filter(|t| t.service == s.name && t.serving).map(|t| t.ip).collect();
            let answer = match (s.mode, s.vip) {
                (Mode::Vip, Some(vip)) => {
                    v.reverse.insert(vip, format!("{}.{}.", s.name, z.name));
                    vec![vip]
                }
                _ => serving.clone(),
            };
            for p in &s.ports {
                let key = format!("_{}._{}.{name}", p.port, if p.udp { "udp" } else { "tcp" });
                let recs = z
                    .tasks
                    .iter()
                    .filter(|t| t.service == s.name && t.serving)
                    .map(|t| (p.target, format!("{}.{}.", t.name, z.name), t.ip))
                    .collect();
                v.srv.insert(key, recs);
            }
            v.names.insert(format!("tasks.{name}"), serving);
            v.names.insert(name, answer);
        }
        for t in &z.tasks {
            // A service's names win over a task's of the same name.
            v.names.entry(t.name.to_ascii_lowercase()).or_insert_with(|| vec![t.ip]);
            v.reverse.insert(t.ip, format!("{}.{}.", t.name, z.name));
        }
        v
    }

    /// True if nothing is forwarded from this network.
    pub fn internal(&self) -> bool {
        self.internal
    }

    /// What `name` (as asked, with or without the trailing dot) is for a
    /// query of `kind`.
    pub fn lookup(&self, name: &str, kind: Kind) -> Lookup {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            return self.reverse(rev, kind);
        }
        let stripped = name.strip_suffix(self.network.as_str()).and_then(|n| n.strip_suffix('.'));
        if name.starts_with('_') {
            let srv = self.srv.get(&name).or_else(|| self.srv.get(stripped?));
            return match (srv, kind) {
                (Some(recs), Kind::Srv) if !recs.is_empty() => Lookup::Srv(recs.clone()),
                (Some(_), _) => Lookup::NoData,
                (None, _) => Lookup::NotOurs,
            };
        }
        let found = self.names.get(&name).or_else(|| self.names.get(stripped?));
        match (found, kind) {
            (Some(ips), Kind::A) if ips.is_empty() => Lookup::NoData,
            (Some(ips), Kind::A) => Lookup::A(ips.clone()),
            (Some(_), _) => Lookup::NoData,
            (None, _) => Lookup::NotOurs,
        }
    }

    /// A reverse name (`d.c.b.a`, the labels before `.in-addr.arpa`).
    fn reverse(&self, rev: &str, kind: Kind) -> Lookup {
        let octets: Vec<u8> = rev.split('.').filter_map(|l| l.parse().ok()).collect();
        let [d, c, b, a] = octets[..] else { return Lookup::NotOurs };
        if rev.split('.').count() != 4 {
            return Lookup::NotOurs;
        }
        let ip = Ipv4Addr::new(a, b, c, d);
        if u32::from(ip) & self.subnet.1 != self.subnet.0 {
            return Lookup::NotOurs;
        }
        match (self.reverse.get(&ip), kind) {
            (Some(n), Kind::Ptr) => Lookup::Ptr(n.clone()),
            (Some(_), _) => Lookup::NoData,
            (None, _) => Lookup::NxDomain,
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::zone::{SrvPort, SvcRec, TaskRec};

    fn zone() -> NetZone {
        let task = |name: &str, service: &str, last: u8, serving: bool| TaskRec {
            name: name.into(),
            service: service.into(),
            ip: Ipv4Addr::new(198, 19, 0, last),
            serving,
        };
        NetZone {
            name: "app".into(),
            vni: 4097,
            gateway: Ipv4Addr::new(198, 19, 0, 254),
            subnet: (Ipv4Addr::new(198, 19, 0, 0), 24),
            internal: false,
            services: vec![
                SvcRec {
                    name: "web".into(),
                    mode: Mode::Vip,
                    vip: Some(Ipv4Addr::new(198, 19, 0, 2)),
                    ports: vec![SrvPort { port: 80, udp: false, target: 8080 }],
                },
                SvcRec { name: "db".into(), mode: Mode::Dnsrr, vip: None, ports: vec![] },
                SvcRec { name: "idle".into(), mode: Mode::Dnsrr, vip: None, ports: vec![] },
            ],
            tasks: vec![
                task("web.1", "web", 5, true),
                task("web.2", "web", 6, true),
                task("web.3", "web", 7, false),
                task("db.1", "db", 8, true),
                task("db.2", "db", 9, true),
            ],
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, last)
    }

    #[test]
    fn names_answer_as_swarms_do() {
        let v = View::build(&zone());
        assert_eq!(v.lookup("web", Kind::A), Lookup::A(vec![ip(2)]), "a vip service: its VIP");
        assert_eq!(v.lookup("WeB.App.", Kind::A), Lookup::A(vec![ip(2)]), "with the network, any case");
        assert_eq!(v.lookup("tasks.web", Kind::A), Lookup::A(vec![ip(5), ip(6)]), "serving tasks only");
        assert_eq!(v.lookup("db", Kind::A), Lookup::A(vec![ip(8), ip(9)]), "dnsrr: its tasks");
        assert_eq!(v.lookup("web.3", Kind::A), Lookup::A(vec![ip(7)]), "a task keeps its own name");
        assert_eq!(v.lookup("web.1.app", Kind::A), Lookup::A(vec![ip(5)]));
        assert_eq!(v.lookup("idle", Kind::A), Lookup::NoData, "nothing serving");
        assert_eq!(v.lookup("web", Kind::Other), Lookup::NoData, "AAAA of a service: NODATA, never forwarded");
        assert_eq!(v.lookup("example.org", Kind::A), Lookup::NotOurs);
        assert_eq!(v.lookup("web.other", Kind::A), Lookup::NotOurs, "another network's suffix");
    }

    #[test]
    fn a_task_named_as_a_service_does_not_take_its_names() {
        let mut z = zone();
        z.tasks.push(TaskRec { name: "web".into(), service: "db".into(), ip: ip(20), serving: true });
        z.tasks.push(TaskRec { name: "tasks.web".into(), service: "db".into(), ip: ip(21), serving: true });
        let v = View::build(&z);
        assert_eq!(v.lookup("web", Kind::A), Lookup::A(vec![ip(2)]), "still the VIP");
        assert_eq!(v.lookup("tasks.web", Kind::A), Lookup::A(vec![ip(5), ip(6)]), "still web's tasks");
    }

    #[test]
    fn reverse_names_are_the_networks() {
        let v = View::build(&zone());
        assert_eq!(v.lookup("2.0.19.198.in-addr.arpa.", Kind::Ptr), Lookup::Ptr("web.app.".into()));
        assert_eq!(v.lookup("6.0.19.198.in-addr.arpa", Kind::Ptr), Lookup::Ptr("web.2.app.".into()));
        assert_eq!(v.lookup("77.0.19.198.in-addr.arpa", Kind::Ptr), Lookup::NxDomain, "ours, no one's");
        assert_eq!(v.lookup("8.8.8.8.in-addr.arpa", Kind::Ptr), Lookup::NotOurs);
        assert_eq!(v.lookup("0.19.198.in-addr.arpa", Kind::Ptr), Lookup::NotOurs, "not an address");
        assert_eq!(v.lookup("6.0.19.198.in-addr.arpa", Kind::A), Lookup::NoData);
    }

    #[test]
    fn srv_records_name_each_serving_task_on_the_target_port() {
        let v = View::build(&zone());
        let recs = vec![(8080, "web.1.app.".to_owned(), ip(5)), (8080, "web.2.app.".to_owned(), ip(6))];
        assert_eq!(v.lookup("_80._tcp.web", Kind::Srv), Lookup::Srv(recs.clone()));
        assert_eq!(v.lookup("_80._TCP.Web.app.", Kind::Srv), Lookup::Srv(recs), "with the network, any case");
        assert_eq!(v.lookup("_80._tcp.web", Kind::A), Lookup::NoData, "a known SRV name, asked for A");
        assert_eq!(v.lookup("_80._udp.web", Kind::Srv), Lookup::NotOurs, "not a port of the service");
        assert_eq!(v.lookup("_81._tcp.web", Kind::Srv), Lookup::NotOurs);
        assert_eq!(v.lookup("web", Kind::Srv), Lookup::NoData, "a service name without a port");
    }
}
