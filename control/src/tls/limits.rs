//! The management plane server's limits: how many connections it holds,
//! how long each step of a connection may take, how large a request may
//! be; and the counters of what it refused or closed.
//!
//! Admission happens at `accept`, before any TLS: a connection over a cap
//! is closed at once (a reset) and counted. Connections from addresses
//! that have shown a certificate of the cluster CA before (members) may
//! use the last `reserved_for_members` places, so a flood from elsewhere
//! cannot keep the managers from reconnecting to each other.

use crate::rpc::ConnStats;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How many member addresses a server remembers (for the reserved places).
const MAX_MEMBER_ADDRS: usize = 4096;

/// A server's limits ([`Limits::default`] is what nodes use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, in total.
    pub max_connections: usize,
    /// Of those, the places only addresses known as members may take.
    pub reserved_for_members: usize,
    /// Connections open at once from one IP address.
    pub max_per_ip: usize,
    /// From `accept` to the end of the TLS handshake.
    pub handshake: Duration,
    /// A whole request, from its first byte (without a certificate: from
    /// the end of the handshake).
    pub request: Duration,
    /// A member's connection with no request in progress is closed after
    /// this long.
    pub idle: Duration,
    /// Writing an answer.
    pub write: Duration,
    /// The largest request without a client certificate (a join).
    pub join_frame: usize,
    /// The largest request from a member (Raft's appends, at most
    /// openraft's `max_payload_entries` = 300 entries, and snapshot chunks,
    /// at most `snapshot_max_chunk_size` = 3 MiB, ≈ 12 MiB as JSON).
    pub request_frame: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            reserved_for_members: 128,
            max_per_ip: 64,
            handshake: Duration::from_secs(5),
            request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            write: Duration::from_secs(10),
            join_frame: 64 << 10,
            request_frame: 16 << 20,
        }
    }
}

struct GateInner {
    open: usize,
    per_ip: HashMap<IpAddr, usize>,
    members: HashSet<IpAddr>,
    stats: ConnStats,
}

/// A server's admission and counters, shared by its connections.
pub(super) struct Gate {
    pub(super) limits: Limits,
    inner: Mutex<GateInner>,
}

/// A connection's place; given back when dropped.
pub(super) struct Ticket {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    pub(super) fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            inner: Mutex::new(GateInner {
                open: 0,
                per_ip: HashMap::new(),
                members: HashSet::new(),
                stats: ConnStats::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, or none (counted).
    pub(super) fn admit(self: &Arc<Gate>, ip: IpAddr) -> Option<Ticket> {
        let mut g = self.lock();
        let cap = if g.members.contains(&ip) {
            self.limits.max_connections
        } else {
            self.limits.max_connections.saturating_sub(self.limits.reserved_for_members)
        };
        if g.open >= cap {
            g.stats.refused_total += 1;
            return None;
        }
        let from_ip = g.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.max_per_ip {
            g.stats.refused_per_ip += 1;
            return None;
        }
        g.per_ip.insert(ip, from_ip + 1);
        g.open += 1;
        g.stats.accepted += 1;
        Some(Ticket { gate: self.clone(), ip })
    }

    /// `ip` showed a certificate of the cluster CA.
    pub(super) fn learn_member(&self, ip: IpAddr) {
        let mut g = self.lock();
        if g.members.len() < MAX_MEMBER_ADDRS {
            g.members.insert(ip);
        }
    }

    /// Counts an event.
    pub(super) fn count(&self, f: impl FnOnce(&mut ConnStats)) {
        f(&mut self.lock().stats);
    }

    /// The counters now.
    pub(super) fn stats(&self) -> ConnStats {
        let g = self.lock();
        ConnStats { open: g.open as u64, ..g.stats.clone() }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.open = g.open.saturating_sub(1);
        if let Some(n) = g.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits { max_connections: 6, reserved_for_members: 2, max_per_ip: 3, ..Limits::default() }
    }

    #[test]
    fn caps_per_address_and_in_total_with_places_for_members() {
        let gate = Gate::new(small());
        let (a, b, m): (IpAddr, IpAddr, IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap(), "198.18.0.3".parse().unwrap());
        gate.learn_member(m);
        let mut held: Vec<Ticket> = (0..3).map(|_| gate.admit(a).unwrap()).collect();
        assert!(gate.admit(a).is_none(), "a fourth from one address");
        held.push(gate.admit(b).unwrap());
        assert!(gate.admit(b).is_none(), "the places left are the members'");
        held.push(gate.admit(m).unwrap());
        held.push(gate.admit(m).unwrap());
        assert!(gate.admit(m).is_none(), "the total");
        let s = gate.stats();
        assert_eq!((s.open, s.accepted, s.refused_per_ip, s.refused_total), (6, 6, 1, 2));
        held.truncate(2);
        assert_eq!(gate.stats().open, 2, "places given back when connections close");
        assert!(gate.admit(a).is_some(), "a's third place is free again");
        drop(held);
        assert!(gate.lock().per_ip.is_empty(), "no address left behind");
    }
}
