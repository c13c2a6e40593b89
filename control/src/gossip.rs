//! Membership and failure detection: SWIM (foca, sans-IO), every packet
//! sealed with an AEAD (XChaCha20-Poly1305) under a cluster key that Raft
//! distributes and rotates; a packet that does not open — tampered,
//! foreign, or under a key no longer held — is dropped and counted.
//!
//! [`Gossip`] is one member: feed it packets and timer events, collect
//! the packets to send, the timers to schedule and the membership changes.
//! [`sim`] runs many of them on a virtual clock with message loss
//! (deterministic for a seed): the tests and the failure-detection bench.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit};
use core::net::SocketAddr;
use foca::{Foca, NoCustomBroadcast, Notification, PostcardCodec, Runtime, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A member's identity: its gossip address and a bump that grows each time
/// it rejoins after being declared down (the newer identity wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GossipId {
    /// The member's gossip address (udp 7946).
    pub addr: SocketAddr,
    /// Rejoin generation.
    pub bump: u16,
}

impl foca::Identity for GossipId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(GossipId { addr: self.addr, bump: self.bump.wrapping_add(1) })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        // Wrapping comparison: the later generation wins.
        self.bump.wrapping_sub(other.bump) < u16::MAX / 2 && self.bump != other.bump
    }
}

/// Bytes in front of the ciphertext: key id and nonce.
const SEAL_HEADER: usize = 1 + 24;

/// The cluster's gossip keys: the current one seals, the current and the
/// previous one open (so a rotation does not cut the cluster in two while
/// it spreads).
#[derive(Clone)]
pub struct Keyring {
    current: (u8, XChaCha20Poly1305),
    previous: Option<(u8, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.0)
            .field("previous", &self.previous.as_ref().map(|p| p.0))
            .finish()
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Shorter than the seal's header and tag.
    #[error("gossip packet shorter than its seal")]
    Short,
    /// Under a key id this member does not hold.
    #[error("gossip packet sealed under a key this node does not hold (rotated out, or another cluster's)")]
    UnknownKey,
    /// The tag does not verify: tampered with, or a foreign cluster's.
    #[error("gossip packet whose seal does not verify (tampered with, or another cluster's)")]
    BadTag,
    /// Opened, but foca could not decode it.
    #[error("gossip packet that opens but does not decode")]
    Undecodable,
}

impl Keyring {
    /// A keyring holding key `id`.
    pub fn new(id: u8, key: &[u8; 32]) -> Keyring {
        Keyring { current: (id, XChaCha20Poly1305::new(key.into())), previous: None }
    }

    /// Seals with key `id` from now on; the old key still opens.
    pub fn rotate(&mut self, id: u8, key: &[u8; 32]) {
        let old = std::mem::replace(&mut self.current, (id, XChaCha20Poly1305::new(key.into())));
        self.previous = Some(old);
    }

    /// `plain` sealed: key id, a random 192-bit nonce, ciphertext and tag.
    pub fn seal(&self, rng: &mut StdRng, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::RngExt::fill(rng, &mut nonce[..]);
        let ct = self.current.1.encrypt((&nonce).into(), plain).unwrap_or_default();
        let mut out = Vec::with_capacity(SEAL_HEADER + ct.len());
        out.push(self.current.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed packet.
    pub fn open(&self, packet: &[u8]) -> Result<Vec<u8>, Rejected> {
        if packet.len() < SEAL_HEADER + 16 {
            return Err(Rejected::Short);
        }
        let id = packet[0];
        let cipher = if id == self.current.0 {
            &self.current.1
        } else {
            match &self.previous {
                Some((p, c)) if *p == id => c,
                _ => return Err(Rejected::UnknownKey),
            }
        };
        let nonce: &[u8; 24] = packet[1..SEAL_HEADER].try_into().map_err(|_| Rejected::Short)?;
        cipher.decrypt(nonce.into(), &packet[SEAL_HEADER..]).map_err(|_| Rejected::BadTag)
    }
}

/// Counters of one member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Packets sent.
    pub sent: u64,
    /// Packets received and accepted.
    pub received: u64,
    /// Packets dropped: short, unknown key, bad tag, undecodable.
    pub rejected: [u64; 4],
}

/// A membership change this member observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member is up (joined, or came back).
    Up(GossipId),
    /// A member was declared down.
    Down(GossipId),
}

/// What foca asked for while handling one input.
#[derive(Default)]
struct Collect {
    send: Vec<(GossipId, Vec<u8>)>,
    timers: Vec<(Duration, Timer<GossipId>)>,
    events: Vec<MemberEvent>,
}

impl Runtime<GossipId> for Collect {
    fn notify(&mut self, n: Notification<'_, GossipId>) {
        match n {
            Notification::MemberUp(id) => self.events.push(MemberEvent::Up(*id)),
            Notification::MemberDown(id) => self.events.push(MemberEvent::Down(*id)),
            _ => {}
        }
    }
    fn send_to(&mut self, to: GossipId, data: &[u8]) {
        self.send.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<GossipId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// Outputs of a [`Gossip`] step.
#[derive(Debug, Default)]
pub struct Output {
    /// Sealed packets to send, by destination address.
    pub send: Vec<(SocketAddr, Vec<u8>)>,
    /// Timer events to hand back after the given delay.
    pub timers: Vec<(Duration, Timer<GossipId>)>,
    /// Membership changes.
    pub events: Vec<MemberEvent>,
}

impl Output {
    /// Adds `other`'s packets, timers and events to these.
    pub fn absorb(&mut self, other: Output) {
        self.send.extend(other.send);
        self.timers.extend(other.timers);
        self.events.extend(other.events);
    }
}

/// meshplane's SWIM settings: memberlist's LAN defaults (foca's
/// `new_lan`, scaled to the cluster size) made faster for a datacenter
/// fabric, so that a dead node leaves every balancer within seconds: a
/// probe every 500 ms answered within 200 ms (3 indirect probes otherwise),
/// a suspect declared down after 1.5 s unless it refutes, updates gossiped
/// to 3 members every 100 ms.
pub fn swim_config(cluster_size: u32) -> foca::Config {
    let n = core::num::NonZeroU32::new(cluster_size.max(1)).unwrap_or(core::num::NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(n);
    c.probe_period = Duration::from_millis(500);
    c.probe_rtt = Duration::from_millis(200);
    c.suspect_to_down_after = Duration::from_millis(1500);
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: core::num::NonZeroUsize::new(3).unwrap_or(core::num::NonZeroUsize::MIN),
    });
    c
}

/// One gossip member.
pub struct Gossip {
    foca: Foca<GossipId, PostcardCodec, StdRng, NoCustomBroadcast>,
    keys: Keyring,
    rng: StdRng,
    /// Counters.
    pub stats: GossipStats,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("id", self.foca.identity()).field("stats", &self.stats).finish()
    }
}

impl Gossip {
    /// A member `id` of a cluster of about `cluster_size` members (SWIM's
    /// LAN settings scaled to it), with `seed` for its randomness.
    pub fn new(id: GossipId, keys: Keyring, cluster_size: u32, seed: u64) -> Gossip {
        let config = swim_config(cluster_size);
        let foca = Foca::new(id, config, StdRng::seed_from_u64(seed), PostcardCodec);
        Gossip { foca, keys, rng: StdRng::seed_from_u64(seed ^ 0x5eed), stats: GossipStats::default() }
    }

    /// The keyring (to rotate keys).
    pub fn keys_mut(&mut self) -> &mut Keyring {
        &mut self.keys
    }

    /// Members this one believes are up (itself excluded).
    pub fn members(&self) -> Vec<GossipId> {
        self.foca.iter_members().map(|m| *m.id()).collect()
    }

    fn finish(&mut self, c: Collect) -> Output {
        let mut out = Output { timers: c.timers, events: c.events, send: Vec::with_capacity(c.send.len()) };
        for (to, data) in c.send {
            out.send.push((to.addr, self.keys.seal(&mut self.rng, &data)));
            self.stats.sent += 1;
        }
        out
    }

    /// Joins through `peer`.
    pub fn announce(&mut self, peer: GossipId) -> Output {
        let mut c = Collect::default();
        let _ = self.foca.announce(peer, &mut c);
        self.finish(c)
    }

    /// A packet from the network.
    pub fn handle_packet(&mut self, packet: &[u8]) -> Output {
        let plain = match self.keys.open(packet) {
            Ok(p) => p,
            Err(r) => {
                self.stats.rejected[r as usize] += 1;
                return Output::default();
            }
        };
        let mut c = Collect::default();
        if self.foca.handle_data(&plain, &mut c).is_err() {
            self.stats.rejected[Rejected::Undecodable as usize] += 1;
        } else {
            self.stats.received += 1;
        }
        self.finish(c)
    }

    /// A timer event whose delay has passed.
    pub fn handle_timer(&mut self, t: Timer<GossipId>) -> Output {
        let mut c = Collect::default();
        let _ = self.foca.handle_timer(t, &mut c);
        self.finish(c)
    }
}

pub mod sim {
    //! Many members on a virtual clock, with message loss and delay:
    //! deterministic for a seed.

    use super::*;
    use rand::RngExt;
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};

    enum Event {
        Packet(usize, Vec<u8>),
        Timer(usize, Timer<GossipId>),
    }

    /// The simulated cluster.
    pub struct Sim {
        /// Members (`None` once killed).
        pub members: Vec<Option<Gossip>>,
        ids: Vec<GossipId>,
        by_addr: HashMap<SocketAddr, usize>,
        queue: BinaryHeap<Reverse<(u64, u64)>>,
        events: HashMap<u64, Event>,
        seq: u64,
        /// Virtual time, microseconds.
        pub now_us: u64,
        rng: StdRng,
        loss: f64,
        /// Every membership change seen: (time µs, observer, event).
        pub seen: Vec<(u64, usize, MemberEvent)>,
        next_rejoin_us: u64,
    }

    impl std::fmt::Debug for Sim {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Sim").field("members", &self.members.len()).field("now_us", &self.now_us).finish()
        }
    }

    /// Member `i`'s address: 198.18.x.y:7946.
    pub fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([198, 18, (i / 250) as u8, (i % 250) as u8 + 1], 7946))
    }

    impl Sim {
        /// `n` members under one key, losing `loss` of all packets; every
        /// member announces itself to member 0 at start.
        pub fn new(n: usize, loss: f64, seed: u64) -> Sim {
            let keys = Keyring::new(1, &[7; 32]);
            let ids: Vec<GossipId> = (0..n).map(|i| GossipId { addr: addr(i), bump: 0 }).collect();
            let members = ids
                .iter()
                .enumerate()
                .map(|(i, id)| Some(Gossip::new(*id, keys.clone(), n as u32, seed ^ (i as u64) << 20)))
                .collect();
            let by_addr = ids.iter().enumerate().map(|(i, id)| (id.addr, i)).collect();
            let mut sim = Sim {
                members,
                ids,
                by_addr,
                queue: BinaryHeap::new(),
                events: HashMap::new(),
                seq: 0,
                now_us: 0,
                rng: StdRng::seed_from_u64(seed),
                loss,
                seen: Vec::new(),
                next_rejoin_us: 1_000_000,
            };
            for i in 1..n {
                let first = sim.ids[0];
                if let Some(Some(m)) = sim.members.get_mut(i) {
                    let out = m.announce(first);
                    sim.take(i, out);
                }
            }
            sim
        }

        fn push(&mut self, at: u64, e: Event) {
            self.seq += 1;
            self.events.insert(self.seq, e);
            self.queue.push(Reverse((at, self.seq)));
        }

        fn take(&mut self, from: usize, out: Output) {
            for (after, t) in out.timers {
                self.push(self.now_us + after.as_micros() as u64, Event::Timer(from, t));
            }
            for (to, pkt) in out.send {
                if self.rng.random::<f64>() < self.loss {
                    continue;
                }
                if let Some(&j) = self.by_addr.get(&to) {
                    let delay = self.rng.random_range(200..3000u64);
                    self.push(self.now_us + delay, Event::Packet(j, pkt));
                }
            }
            for e in out.events {
                self.seen.push((self.now_us, from, e));
            }
        }

        /// Members that know nobody announce themselves to member 0 again,
        /// as a joining node's join loop does until it is admitted (an
        /// announce can be lost like any packet).
        fn rejoin_isolated(&mut self) {
            let first = self.ids[0];
            for i in 1..self.members.len() {
                if let Some(Some(m)) = self.members.get_mut(i)
                    && m.members().is_empty()
                {
                    let out = m.announce(first);
                    self.take(i, out);
                }
            }
        }

        /// Runs until virtual time `until_us`.
        pub fn run_until(&mut self, until_us: u64) {
            while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
                if at > until_us {
                    break;
                }
                // Once a second of virtual time: the join loop.
                if at >= self.next_rejoin_us {
                    self.now_us = self.next_rejoin_us;
                    self.next_rejoin_us += 1_000_000;
                    self.rejoin_isolated();
                    continue;
                }
                self.queue.pop();
                self.now_us = at;
                let Some(e) = self.events.remove(&seq) else { continue };
                let (i, out) = match e {
                    Event::Packet(i, p) => match self.members.get_mut(i) {
                        Some(Some(m)) => (i, m.handle_packet(&p)),
                        _ => continue,
                    },
                    Event::Timer(i, t) => match self.members.get_mut(i) {
                        Some(Some(m)) => (i, m.handle_timer(t)),
                        _ => continue,
                    },
                };
                self.take(i, out);
            }
            self.now_us = until_us;
        }

        /// Member `i` stops (crashes): it sends and answers nothing more.
        pub fn kill(&mut self, i: usize) {
            if let Some(m) = self.members.get_mut(i) {
                *m = None;
            }
        }

        /// Member `i` comes back (restarted, a new generation) and joins
        /// through member 0.
        pub fn revive(&mut self, i: usize) {
            let Some(old) = self.ids.get(i).copied() else { return };
            let id = GossipId { addr: old.addr, bump: old.bump.wrapping_add(1) };
            self.ids[i] = id;
            let n = self.members.len() as u32;
            let mut m = Gossip::new(id, Keyring::new(1, &[7; 32]), n, self.rng.random());
            let out = m.announce(self.ids[0]);
            self.members[i] = Some(m);
            self.take(i, out);
        }

        /// Delivers a raw packet to member `i` now (a forged or foreign one).
        pub fn inject(&mut self, i: usize, packet: Vec<u8>) {
            self.push(self.now_us, Event::Packet(i, packet));
        }

        /// Members alive.
        pub fn alive(&self) -> impl Iterator<Item = usize> + '_ {
            self.members.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i)
        }

        /// Member `i`'s identity.
        pub fn id(&self, i: usize) -> GossipId {
            self.ids[i]
        }
    }
}
