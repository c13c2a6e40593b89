//! Connection tracking, per worker and without locks: 5-tuple → backend and
//! NAT state, with TCP state and IPVS's timeouts.
//!
//! Sized when the worker starts and never grown on the packet path: a
//! set-associative table (buckets of [`WAYS`] entries, each entry at most
//! 64 bytes), the bucket chosen by a seeded hash of the 5-tuple. A new flow
//! takes a free or expired way of its bucket; when all ways are live, the
//! way seen longest ago is evicted (least recently used within the set, as
//! a CPU cache evicts; counted). Expired entries are found lazily by
//! lookups and inserts, and by [`Conntrack::sweep`], which a worker calls
//! between bursts with a small budget.
//!
//! Flood guard (Katran's): above a configured rate of new flows per second,
//! new flows are still balanced (by the caller, with the Maglev table, which
//! needs no state) but not inserted, so a SYN flood cannot evict the
//! established connections. Counted.

use crate::wire::flow::hash2;

/// Entries per bucket.
pub const WAYS: usize = 8;

/// One second in the clock's unit (nanoseconds).
pub const SECOND: u64 = 1_000_000_000;

/// The 5-tuple of a flow, as seen on the wire in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source IPv4 address (host order).
    pub src: u32,
    /// Destination IPv4 address.
    pub dst: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol (6 TCP, 17 UDP; never 0).
    pub proto: u8,
}

impl FlowKey {
    /// Packed into two words; `k1` is never 0 for a real key (the protocol
    /// is never 0), which marks a free entry.
    #[inline(always)]
    fn pack(&self) -> (u64, u64) {
        (
            (u64::from(self.src) << 32) | u64::from(self.dst),
            (u64::from(self.sport) << 48) | (u64::from(self.dport) << 32) | u64::from(self.proto),
        )
    }
}

/// TCP connection state, as far as a load balancer follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CtState {
    /// UDP (or other datagram) flow.
    Udp = 0,
    /// TCP: a SYN seen, no established traffic yet.
    SynRecv = 1,
    /// TCP: established.
    Established = 2,
    /// TCP: a FIN seen.
    Fin = 3,
    /// TCP: a RST seen.
    Close = 4,
}

/// TCP flags the state machine reads.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// What a tracked flow remembers beyond its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtValue {
    /// Service index in the tables.
    pub service: u32,
    /// Backend index within the service.
    pub backend: u32,
    /// An address (host order): the backend's on a forward entry (so a
    /// changed backend list is noticed); on a reply entry, the address the
    /// reply's source becomes (the VIP), or the client's (routing mesh).
    pub peer: u32,
    /// The port that goes with `peer`.
    pub port: u16,
    /// A second port: the routing mesh's published port (reply entries)
    /// or SNAT source port (forward entries).
    pub port2: u16,
    /// A MAC: the client's next hop on the underlay (routing mesh), so
    /// replies go back where the request came from.
    pub mac: [u8; 6],
    /// State.
    pub state: CtState,
    /// Spare bits for the caller (direction, mode).
    pub flags: u8,
}

impl CtValue {
    /// All zero, UDP: a base for struct update syntax.
    pub const ZERO: CtValue =
        CtValue { service: 0, backend: 0, peer: 0, port: 0, port2: 0, mac: [0; 6], state: CtState::Udp, flags: 0 };
}

/// A key packed and hashed to its bucket ([`Conntrack::probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    k0: u64,
    k1: u64,
    /// Index of the bucket's first entry.
    at: usize,
}

impl Probe {
    /// The key this is the probe of.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: (self.k0 >> 32) as u32,
            dst: self.k0 as u32,
            sport: (self.k1 >> 48) as u16,
            dport: (self.k1 >> 32) as u16,
            proto: self.k1 as u8,
        }
    }
}

/// A table entry: 56 bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    k0: u64,
    /// 0: free.
    k1: u64,
    expires: u64,
    last_seen: u64,
    v: CtValue,
}

const _: () = assert!(core::mem::size_of::<Entry>() <= 64, "a conntrack entry is at most 64 bytes");
// A bucket is whole cache lines (7 of them), so buckets of a table that
// starts on a line never straddle one more line than they need.
const _: () = assert!((WAYS * core::mem::size_of::<Entry>()).is_multiple_of(64), "a bucket is whole cache lines");

// SAFETY: integers, and `CtState` (a fieldless enum whose 0 is `Udp`): the
// all-zero entry is `FREE`.
#[allow(unsafe_code)]
unsafe impl super::hugemem::Zeroable for Entry {}

const FREE: Entry = Entry { k0: 0, k1: 0, expires: 0, last_seen: 0, v: CtValue::ZERO };

/// Timeouts (nanoseconds) and limits. Defaults are IPVS's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtConfig {
    /// Entries (rounded up to whole buckets; at least one bucket).
    pub capacity: usize,
    /// Established TCP (IPVS: 900 s).
    pub tcp_established: u64,
    /// TCP after a FIN (IPVS: 120 s).
    pub tcp_fin: u64,
    /// TCP after a SYN only (IPVS SYN_RECV: 60 s).
    pub tcp_syn: u64,
    /// TCP after a RST (IPVS CLOSE: 10 s).
    pub tcp_close: u64,
    /// UDP (IPVS: 300 s).
    pub udp: u64,
    /// Flood guard: new entries per second per worker; 0 for no limit.
    pub max_new_per_sec: u32,
    /// Hash seed.
    pub seed: u64,
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig {
            capacity: 1 << 20,
            tcp_established: 900 * SECOND,
            tcp_fin: 120 * SECOND,
            tcp_syn: 60 * SECOND,
            tcp_close: 10 * SECOND,
            udp: 300 * SECOND,
            max_new_per_sec: 0,
            seed: 0x636f_6e6e_7472_6163, // "conntrac"
        }
    }
}

impl CtConfig {
    /// The timeout of a state.
    #[inline]
    pub fn timeout(&self, s: CtState) -> u64 {
        match s {
            CtState::Udp => self.udp,
            CtState::SynRecv => self.tcp_syn,
            CtState::Established => self.tcp_established,
            CtState::Fin => self.tcp_fin,
            CtState::Close => self.tcp_close,
        }
    }
}

/// Counters of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtStats {
    /// Entries inserted.
    pub inserted: u64,
    /// Live entries evicted to make room.
    pub evicted: u64,
    /// Entries found expired and freed.
    pub expired: u64,
    /// New flows not inserted because of the flood guard.
    pub guarded: u64,
    /// Entries removed by the caller.
    pub removed: u64,
}

/// What [`Conntrack::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Into a free or expired way (the expired entry's value, if any, so
    /// the caller can release what it held).
    Fresh(Option<CtValue>),
    /// By evicting a live entry (its value).
    Evicted(CtValue),
    /// Not inserted: the flood guard is on.
    Guarded,
}

/// A worker's connection table.
#[derive(Debug, Clone)]
pub struct Conntrack {
    /// In huge pages where the kernel gives them (see `hugemem`); starts
    /// on a 2 MiB boundary, so every bucket starts on a cache line.
    entries: super::hugemem::HugeArray<Entry>,
    buckets: u64,
    cfg: CtConfig,
    /// `cfg`'s timeouts by `CtState as usize` (one load on a hit).
    timeouts: [u64; 5],
    len: usize,
    /// Flood guard window: its start and the inserts in it.
    window: (u64, u32),
    sweep_at: usize,
    /// Counters.
    pub stats: CtStats,
}

impl Conntrack {
    /// A table of `cfg.capacity` entries (rounded up to whole buckets).
    pub fn new(cfg: CtConfig) -> Conntrack {
        let buckets = cfg.capacity.div_ceil(WAYS).max(1);
        Conntrack {
            entries: super::hugemem::HugeArray::zeroed(buckets * WAYS),
            buckets: buckets as u64,
            timeouts: [CtState::Udp, CtState::SynRecv, CtState::Established, CtState::Fin, CtState::Close]
                .map(|s| cfg.timeout(s)),
            cfg,
            len: 0,
            window: (0, 0),
            sweep_at: 0,
            stats: CtStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CtConfig {
        &self.cfg
    }

    /// Entries in use (live or expired but not yet found).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no entry is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the table holds at most.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    #[inline(always)]
    fn bucket(&self, k0: u64, k1: u64) -> usize {
        let h = hash2(self.cfg.seed, k0, k1);
        (((u64::from(h) * self.buckets) >> 32) as usize) * WAYS
    }

    /// The packed key and bucket of `key`: what a lookup needs, computed
    /// once. The burst loop computes it when it prefetches the bucket a few
    /// frames ahead and hands it to the lookup, which then neither packs
    /// nor hashes the key again.
    #[inline(always)]
    pub fn probe(&self, key: &FlowKey) -> Probe {
        let (k0, k1) = key.pack();
        Probe { k0, k1, at: self.bucket(k0, k1) }
    }

    /// Prefetches the bucket of `key` (a hint: nothing observable changes),
    /// so that a lookup or insert a few frames later finds it in cache: the
    /// burst loop calls it ahead of the frame, as VPP's bihash prefetches a
    /// bucket a stage before its lookup.
    #[inline(always)]
    pub fn prefetch(&self, key: &FlowKey) {
        self.prefetch_probe(&self.probe(key));
    }

    /// [`Conntrack::prefetch`] of a probe's bucket.
    #[inline(always)]
    pub fn prefetch_probe(&self, p: &Probe) {
        let p = self.entries.as_ptr().wrapping_add(p.at).cast::<u8>();
        // The bucket's 8 entries are 448 bytes: 7 whole cache lines.
        const BYTES: usize = WAYS * core::mem::size_of::<Entry>();
        for off in (0..BYTES).step_by(64) {
            crate::wire::prefetch(p.wrapping_add(off));
        }
    }

    /// The live entry of `key` at time `now`, refreshed: its state follows
    /// `tcp_flags` (TCP only; pass 0 for UDP) and its timeout restarts.
    /// `None` if there is none (an expired one is freed and its value
    /// returned through [`Conntrack::lookup_or_expired`] instead).
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Option<CtValue> {
        self.lookup_or_expired(key, now, tcp_flags).ok()
    }

    /// [`Conntrack::lookup`], returning `Err(Some(value))` when the entry
    /// had expired (it is freed; the caller releases what it held) and
    /// `Err(None)` when there was none.
    #[inline]
    pub fn lookup_or_expired(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Result<CtValue, Option<CtValue>> {
        let p = self.probe(key);
        self.lookup_probe(&p, now, tcp_flags)
    }

    /// [`Conntrack::lookup_or_expired`] of the key `p` was made from (by
    /// [`Conntrack::probe`] of this table).
    #[inline(always)]
    pub fn lookup_probe(&mut self, p: &Probe, now: u64, tcp_flags: u8) -> Result<CtValue, Option<CtValue>> {
        let (k0, k1) = (p.k0, p.k1);
        let Some(set) = self.entries.get_mut(p.at..p.at + WAYS) else { return Err(None) };
        for e in set {
            if e.k1 == k1 && e.k0 == k0 {
                if e.expires <= now {
                    let v = e.v;
                    *e = FREE;
                    self.len -= 1;
                    self.stats.expired += 1;
                    return Err(Some(v));
                }
                // The protocol is the key's low byte. An established TCP
                // connection stays so without SYN, FIN or RST (what
                // `next_state` says, decided in one test).
                use tcp_flags::{FIN, RST, SYN};
                if k1 as u8 == 6 && (e.v.state != CtState::Established || tcp_flags & (SYN | FIN | RST) != 0) {
                    e.v.state = next_state(e.v.state, tcp_flags);
                }
                e.last_seen = now;
                e.expires = now + self.timeouts[e.v.state as usize];
                return Ok(e.v);
            }
        }
        Err(None)
    }

    /// Inserts `key` → `v` at time `now` (the caller has looked it up and
    /// found nothing). Takes the first free or expired way of the key's
    /// bucket, else evicts the way seen longest ago; above the flood-guard
    /// rate it inserts nothing.
    pub fn insert(&mut self, key: &FlowKey, v: CtValue, now: u64) -> Inserted {
        let p = self.probe(key);
        self.insert_probe(&p, v, now, true)
    }

    /// [`Conntrack::insert`] without the flood guard: for the second entry
    /// of a connection the guard admitted (its reply direction), so that a
    /// connection is tracked in both directions or not at all.
    pub fn insert_unguarded(&mut self, key: &FlowKey, v: CtValue, now: u64) -> Inserted {
        let p = self.probe(key);
        self.insert_probe(&p, v, now, false)
    }

    /// [`Conntrack::insert`] (`guarded`) or [`Conntrack::insert_unguarded`]
    /// of the key `p` was made from (by [`Conntrack::probe`] of this table).
    #[inline]
    pub fn insert_probe(&mut self, p: &Probe, v: CtValue, now: u64, guarded: bool) -> Inserted {
        if guarded && self.cfg.max_new_per_sec > 0 {
            if now.saturating_sub(self.window.0) >= SECOND {
                self.window = (now, 0);
            }
            if self.window.1 >= self.cfg.max_new_per_sec {
                self.stats.guarded += 1;
                return Inserted::Guarded;
            }
            self.window.1 += 1;
        }
        let entry = Entry { k0: p.k0, k1: p.k1, expires: now + self.timeouts[v.state as usize], last_seen: now, v };
        let Some(set) = self.entries.get_mut(p.at..p.at + WAYS) else { return Inserted::Guarded };
        self.stats.inserted += 1;
        // The first way that is free or expired (a free way's expiry is 0,
        // so one comparison finds both), else the one seen longest ago
        // (the first of those): one pass, stopping at the first usable way.
        let (mut victim, mut oldest) = (0, u64::MAX);
        for (i, e) in set.iter_mut().enumerate() {
            if e.expires <= now {
                let was = (e.k1 != 0).then_some(e.v);
                *e = entry;
                if was.is_some() {
                    self.stats.expired += 1;
                } else {
                    self.len += 1;
                }
                return Inserted::Fresh(was);
            }
            if e.last_seen < oldest {
                (victim, oldest) = (i, e.last_seen);
            }
        }
        let old = set[victim].v;
        set[victim] = entry;
        self.stats.evicted += 1;
        Inserted::Evicted(old)
    }

    /// True if `key` has a live entry at `now` (nothing is refreshed).
    pub fn contains(&self, key: &FlowKey, now: u64) -> bool {
        let (k0, k1) = key.pack();
        let b = self.bucket(k0, k1);
        self.entries.get(b..b + WAYS).is_some_and(|set| set.iter().any(|e| e.k1 == k1 && e.k0 == k0 && e.expires > now))
    }

    /// Removes `key`'s entry; its value if there was one.
    pub fn remove(&mut self, key: &FlowKey) -> Option<CtValue> {
        let (k0, k1) = key.pack();
        let b = self.bucket(k0, k1);
        let e = self.entries.get_mut(b..b + WAYS)?.iter_mut().find(|e| e.k1 == k1 && e.k0 == k0)?;
        let v = e.v;
        *e = FREE;
        self.len -= 1;
        self.stats.removed += 1;
        Some(v)
    }

    /// Frees expired entries among the next `budget` entries (round robin
    /// over the table), calling `released` with each freed value. A worker
    /// calls it between bursts so that idle flows release their backends
    /// (connection counts, drained backends) without a timer per entry.
    pub fn sweep(&mut self, now: u64, budget: usize, mut released: impl FnMut(CtValue)) {
        let n = self.entries.len();
        for _ in 0..budget.min(n) {
            let i = self.sweep_at;
            self.sweep_at = if i + 1 == n { 0 } else { i + 1 };
            if let Some(e) = self.entries.get_mut(i)
                && e.k1 != 0
                && e.expires <= now
            {
                released(e.v);
                *e = FREE;
                self.len -= 1;
                self.stats.expired += 1;
            }
        }
    }

    /// Every live entry: its key, value and expiry time (diagnostics:
    /// `meshplane conntrack ls`).
    pub fn entries(&self, now: u64) -> impl Iterator<Item = (FlowKey, CtValue, u64)> + '_ {
        self.entries.iter().filter(move |e| e.k1 != 0 && e.expires > now).map(|e| {
            let key = FlowKey {
                src: (e.k0 >> 32) as u32,
                dst: e.k0 as u32,
                sport: (e.k1 >> 48) as u16,
                dport: (e.k1 >> 32) as u16,
                proto: e.k1 as u8,
            };
            (key, e.v, e.expires)
        })
    }

    /// Every live entry's value (diagnostics, tests, draining checks).
    pub fn values(&self, now: u64) -> impl Iterator<Item = CtValue> + '_ {
        self.entries.iter().filter(move |e| e.k1 != 0 && e.expires > now).map(|e| e.v)
    }

    /// Rewrites every live entry's value with `f` (returning `None` removes
    /// the entry, reporting its value to the caller through `f`'s side
    /// effects): for backend removal and renumbering when tables change.
    pub fn retain_map(&mut self, mut f: impl FnMut(CtValue) -> Option<CtValue>) {
        for e in self.entries.iter_mut().filter(|e| e.k1 != 0) {
            match f(e.v) {
                Some(v) => e.v = v,
                None => {
                    *e = FREE;
                    self.len -= 1;
                    self.stats.removed += 1;
                }
            }
        }
    }
}

/// The TCP state after a segment with `flags`.
#[inline]
pub fn next_state(s: CtState, flags: u8) -> CtState {
    use tcp_flags::*;
    if flags & RST != 0 {
        CtState::Close
    } else if flags & FIN != 0 {
        CtState::Fin
    } else if flags & SYN != 0 && flags & ACK == 0 {
        // A new SYN on a closed or closing flow starts it again.
        match s {
            CtState::Established => CtState::Established,
            _ => CtState::SynRecv,
        }
    } else if flags & ACK != 0 && matches!(s, CtState::SynRecv | CtState::Established) {
        CtState::Established
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_flags::*;

    #[test]
    fn established_stays_established_without_syn_fin_rst() {
        // The shortcut `lookup_probe` takes for an established connection.
        for f in 0..=255u8 {
            let expect = if f & (SYN | FIN | RST) == 0 { Some(CtState::Established) } else { None };
            if let Some(e) = expect {
                assert_eq!(next_state(CtState::Established, f), e, "flags {f:#x}");
            }
        }
        let mut ct = Conntrack::new(CtConfig { capacity: 64, ..CtConfig::default() });
        ct.insert(&key(9), CtValue { state: CtState::Established, ..CtValue::ZERO }, 0);
        assert_eq!(ct.lookup(&key(9), 1, ACK | 0x08).map(|v| v.state), Some(CtState::Established));
        assert_eq!(ct.lookup(&key(9), 2, FIN | ACK).map(|v| v.state), Some(CtState::Fin), "FIN still moves it on");
    }

    fn key(i: u32) -> FlowKey {
        FlowKey { src: 0xc612_0000 + i, dst: 0xc613_0001, sport: 40000 + (i % 1000) as u16, dport: 80, proto: 6 }
    }

    fn val(backend: u32, state: CtState) -> CtValue {
        CtValue { service: 1, backend, state, ..CtValue::ZERO }
    }

    fn small(capacity: usize) -> Conntrack {
        Conntrack::new(CtConfig { capacity, ..CtConfig::default() })
    }

    #[test]
    fn insert_lookup_remove() {
        let mut ct = small(64);
        assert_eq!(ct.lookup(&key(1), 0, SYN), None);
        assert_eq!(ct.insert(&key(1), val(3, CtState::SynRecv), 0), Inserted::Fresh(None));
        assert_eq!(ct.lookup(&key(1), 1, ACK).map(|v| (v.backend, v.state)), Some((3, CtState::Established)));
        assert_eq!(ct.lookup(&key(2), 1, ACK), None, "another flow");
        let mut rev = key(1);
        core::mem::swap(&mut rev.src, &mut rev.dst);
        assert_eq!(ct.lookup(&rev, 1, ACK), None, "direction matters");
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.remove(&key(1)).map(|v| v.backend), Some(3));
        assert_eq!((ct.len(), ct.lookup(&key(1), 2, ACK)), (0, None));
    }

    #[test]
    fn timeouts_follow_the_state_with_a_fake_clock() {
        let cfg = CtConfig::default();
        let mut ct = Conntrack::new(CtConfig { capacity: 64, ..cfg });
        // SYN only: gone after 60 s.
        ct.insert(&key(1), val(0, CtState::SynRecv), 0);
        assert!(ct.lookup(&key(1), 60 * SECOND - 1, 0).is_some());
        assert_eq!(ct.lookup_or_expired(&key(1), 120 * SECOND, 0), Err(Some(val(0, CtState::SynRecv))));
        assert_eq!(ct.len(), 0);
        // Established: 900 s after the last packet, refreshed by each.
        ct.insert(&key(2), val(0, CtState::SynRecv), 0);
        ct.lookup(&key(2), 1, ACK);
        assert!(ct.lookup(&key(2), 1 + 899 * SECOND, ACK).is_some());
        assert!(ct.lookup(&key(2), 1 + 899 * SECOND + 900 * SECOND - 1, ACK).is_some());
        assert_eq!(ct.lookup(&key(2), 1 + 899 * SECOND + 1800 * SECOND, ACK), None);
        // FIN: 120 s; RST: 10 s.
        ct.insert(&key(3), val(0, CtState::Established), 0);
        assert_eq!(ct.lookup(&key(3), 0, FIN | ACK).map(|v| v.state), Some(CtState::Fin));
        assert!(ct.lookup(&key(3), 119 * SECOND, 0).is_some());
        assert_eq!(ct.lookup(&key(3), 119 * SECOND + 120 * SECOND, 0), None);
        ct.insert(&key(4), val(0, CtState::Established), 0);
        assert_eq!(ct.lookup(&key(4), 0, RST).map(|v| v.state), Some(CtState::Close));
        assert_eq!(ct.lookup(&key(4), 10 * SECOND, 0), None);
        // UDP: 300 s.
        let udp = FlowKey { proto: 17, ..key(5) };
        ct.insert(&udp, val(0, CtState::Udp), 0);
        assert!(ct.lookup(&udp, 299 * SECOND, 0).is_some());
        assert_eq!(ct.lookup(&udp, 299 * SECOND + 300 * SECOND, 0), None);
        // Configurable.
        let mut short = Conntrack::new(CtConfig { capacity: 64, udp: 5 * SECOND, ..cfg });
        short.insert(&udp, val(0, CtState::Udp), 0);
        assert_eq!(short.lookup(&udp, 5 * SECOND, 0), None);
    }

    #[test]
    fn full_bucket_evicts_the_least_recently_seen() {
        // One bucket: WAYS entries fill it; the next evicts the oldest.
        let mut ct = small(WAYS);
        for i in 0..WAYS as u32 {
            assert_eq!(ct.insert(&key(i), val(i, CtState::Established), u64::from(i) + 10), Inserted::Fresh(None));
        }
        // Touch flow 0 so that flow 1 is now the oldest.
        ct.lookup(&key(0), 100, ACK);
        assert_eq!(
            ct.insert(&key(99), val(99, CtState::SynRecv), 101),
            Inserted::Evicted(val(1, CtState::Established))
        );
        assert_eq!(ct.lookup(&key(1), 102, ACK), None);
        assert!(ct.lookup(&key(0), 102, ACK).is_some());
        assert_eq!((ct.len(), ct.stats.evicted), (WAYS, 1));
        // An expired way is reused before a live one is evicted (every
        // entry has expired by then).
        let late = 100 + 1000 * SECOND;
        let r = ct.insert(&key(100), val(100, CtState::SynRecv), late);
        assert!(matches!(r, Inserted::Fresh(Some(_))), "{r:?}");
        assert_eq!(ct.stats.evicted, 1);
    }

    #[test]
    fn capacity_is_fixed_and_never_exceeded() {
        let mut ct = small(1000);
        let cap = ct.capacity();
        assert!((1000..1000 + WAYS).contains(&cap));
        for i in 0..10_000 {
            ct.insert(&key(i), val(0, CtState::Udp), u64::from(i));
        }
        assert_eq!(ct.len(), cap);
        assert_eq!(ct.capacity(), cap);
        assert_eq!(ct.stats.inserted, 10_000);
        assert_eq!(ct.stats.evicted, 10_000 - cap as u64);
        // The newest flows survive.
        assert!(ct.lookup(&key(9_999), 10_000, 0).is_some());
    }

    #[test]
    fn flood_guard_stops_inserting_above_the_rate() {
        let mut ct = Conntrack::new(CtConfig { capacity: 4096, max_new_per_sec: 100, ..CtConfig::default() });
        let mut guarded = 0;
        for i in 0..300 {
            if ct.insert(&key(i), val(0, CtState::SynRecv), 1000 + u64::from(i)) == Inserted::Guarded {
                guarded += 1;
            }
        }
        assert_eq!((ct.len(), guarded, ct.stats.guarded), (100, 200, 200));
        // Flows already tracked are untouched; a new second admits more.
        assert!(ct.lookup(&key(0), 2000, ACK).is_some());
        assert_eq!(ct.insert(&key(500), val(0, CtState::SynRecv), 1000 + SECOND), Inserted::Fresh(None));
    }

    #[test]
    fn sweep_releases_expired_entries() {
        let mut ct = small(256);
        for i in 0..50 {
            ct.insert(&key(i), val(i, CtState::Udp), 0);
        }
        ct.insert(&FlowKey { proto: 17, ..key(1000) }, val(7, CtState::Udp), 200 * SECOND);
        let mut released = Vec::new();
        // Half the table per call; two calls cover it.
        ct.sweep(301 * SECOND, ct.capacity() / 2, |v| released.push(v.backend));
        ct.sweep(301 * SECOND, ct.capacity() / 2, |v| released.push(v.backend));
        released.sort_unstable();
        assert_eq!(released, (0..50).collect::<Vec<_>>());
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.values(301 * SECOND).map(|v| v.backend).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn tcp_state_machine() {
        use CtState::*;
        assert_eq!(next_state(SynRecv, ACK), Established);
        assert_eq!(next_state(SynRecv, SYN), SynRecv);
        assert_eq!(next_state(Established, SYN), Established);
        assert_eq!(next_state(Established, FIN | ACK), Fin);
        assert_eq!(next_state(Fin, ACK), Fin);
        assert_eq!(next_state(Fin, SYN), SynRecv, "port reuse starts over");
        assert_eq!(next_state(Established, RST), Close);
        assert_eq!(next_state(Close, ACK), Close);
    }
}
