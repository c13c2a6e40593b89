//! Connection tracking, per worker and without locks: 5-tuple → backend and
//! NAT state, with TCP state and IPVS's timeouts.
//!
//! Sized when the worker starts and never grown on the packet path: a
//! set-associative table (buckets of [`WAYS`] entries of 32 bytes: a bucket
//! is four cache lines), the bucket chosen by a seeded hash of the 5-tuple
//! or of one of its endpoints ([`Bucket`]). A new flow
//! takes a free or expired way of its bucket; when all ways are live, the
//! way seen longest ago is evicted (least recently used within the set, as
//! a CPU cache evicts; counted). Expired entries are found lazily by
//! lookups and inserts, and by [`Conntrack::sweep`], which a worker calls
//! between bursts with a small budget.
//!
//! Unconfirmed entries: a TCP segment without SYN of a connection the
//! table does not know (a connection from before a restart, or a spoofed
//! ACK) is picked up, as the kernel's `nf_conntrack_tcp_loose` does, but
//! as [`CtState::Unconfirmed`]: a few seconds' timeout, promoted only when
//! a reply-direction packet is seen ([`Conntrack::lookup_reply_probe`],
//! [`Conntrack::confirm_probe`]; a reset from the backend, which is what
//! it answers to a segment of a connection it does not have, does not
//! promote), evicted before any confirmed entry whatever its age, and
//! never evicting a confirmed entry itself (no room: not inserted,
//! counted).
//!
//! Flood guard (Katran's): above a configured rate of new flows per second,
//! new flows are not inserted (the caller drops them, counted), so a flood
//! cannot churn the table or evict established connections; pickups of
//! unconfirmed connections get a quarter of the rate, so a flood of
//! spoofed segments cannot starve real SYNs of it.
//!
//! The hash seed is random per process by default ([`CtConfig::default`]),
//! so that nobody outside can aim flows at one bucket.

use crate::wire::flow::hash2;
use crate::wire::frame::Head;

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
    /// The 5-tuple of a frame of the common shape, read from its head (the
    /// caller has checked it is plain IPv4 carrying TCP or UDP).
    #[inline(always)]
    pub fn of(h: &Head<'_>) -> FlowKey {
        FlowKey {
            src: u32::from_be_bytes(h.src_ip()),
            dst: u32::from_be_bytes(h.dst_ip()),
            sport: h.src_port(),
            dport: h.dst_port(),
            proto: h.protocol(),
        }
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
    /// TCP: picked up from a segment without SYN, no reply seen yet (see
    /// the module's doc).
    Unconfirmed = 5,
    /// An ICMP query (echo) mapping.
    Icmp = 6,
    /// A UDP query to the node's DNS server (short-lived: a resolver uses
    /// a fresh source port per query).
    Dns = 7,
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
    /// Five bits for the caller (direction, mode; [`FLAG_MASK`]).
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
    /// Source and destination address.
    k0: u64,
    /// Source and destination port.
    ports: u32,
    proto: u8,
    /// Index of the bucket's first entry.
    at: usize,
}

impl Probe {
    /// The key's bits of `Entry::k1`.
    #[inline(always)]
    fn k1(&self) -> u64 {
        u64::from(self.ports) | (u64::from(self.proto) << 32)
    }

    /// For the probe of a key in [`Bucket::Src`], the probe in
    /// [`Bucket::Dst`] of its reply from `src`:`sport` (to this key's
    /// source; the same protocol): the same bucket, so no hash.
    #[inline(always)]
    pub fn reply_from(&self, src: u32, sport: u16) -> Probe {
        Probe {
            k0: (u64::from(src) << 32) | (self.k0 >> 32),
            ports: (u32::from(sport) << 16) | (self.ports >> 16),
            proto: self.proto,
            at: self.at,
        }
    }

    /// The key this is the probe of.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: (self.k0 >> 32) as u32,
            dst: self.k0 as u32,
            sport: (self.ports >> 16) as u16,
            dport: self.ports as u16,
            proto: self.proto,
        }
    }
}

/// What chooses a key's bucket ([`Conntrack::probe_in`]).
///
/// A connection without source NAT has the same endpoint on the client's
/// side in both directions: the forward key's source is the reply key's
/// destination. Hashing only that endpoint puts both entries of the
/// connection in one bucket, so that opening it touches one random bucket,
/// not two (the reply's insert finds the lines the forward lookup brought
/// in). The price: the connections of one client address and port (one
/// socket) share a bucket, two entries each, so such a socket keeps at
/// most [`WAYS`]` / 2` of them at once (fewer where other flows share the
/// bucket); more evict each other, least recently seen first, and the
/// balancer then evicts the other half of the evicted connection too
/// (`lb::LbState`), so none is left tracked in one direction only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The whole 5-tuple (entries whose endpoints do not spread: replies
    /// to a source-NAT address, which all share this node's address).
    Tuple,
    /// The source address, port and protocol: a connection's forward key.
    Src,
    /// The destination address, port and protocol: its reply key.
    Dst,
}

/// The clock's unit in an entry: 2^20 ns (about 1.05 ms). Expiry times are
/// kept as 32 bits of these ticks and compared with wrap-around, as Linux
/// keeps `nf_conn`'s timeout in 32-bit jiffies.
pub const TICK_SHIFT: u32 = 20;

/// The longest timeout a table takes, in ticks (2^30: about 13 days);
/// longer ones are cut to it. A quarter of the 32-bit tick range, so that
/// "expires after now, within the longest timeout" is one wrapping
/// comparison with room to spare.
const MAX_TIMEOUT_TICKS: u32 = 1 << 30;

/// How far before the latest time a table was given a caller may still
/// ask about it and see the entries live then (2^26 ticks, about 19 h):
/// diagnostics may read with a time a little older than the packet path's.
const BACKWARD_SLACK: u32 = 1 << 26;

/// The tick of a time in nanoseconds (truncated to 32 bits: compared with
/// wrap-around).
#[inline(always)]
fn tick(now: u64) -> u32 {
    (now >> TICK_SHIFT) as u32
}

/// `CtValue::flags` bits an entry keeps (the low five).
pub const FLAG_MASK: u8 = 0x1f;

/// Service indices an entry keeps (31 bits).
pub const MAX_SERVICE: u32 = (1 << 31) - 1;

/// A table entry: 32 bytes, eight to a bucket of four cache lines. The key
/// and every value field but the MAC; a MAC (only routing-mesh entries
/// have one) is kept in a side array at the same index, read only for
/// entries marked `HAS_MAC`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    /// Source address << 32 | destination address.
    k0: u64,
    /// Bits 0-31: source port << 16 | destination port; 32-39: the IP
    /// protocol (0 marks a free entry); 40-47: state (bits 40-42) and the
    /// caller's flags (43-47); 48-62: the service index's high 15 bits;
    /// 63: `HAS_MAC`. The key is the low 40 bits ([`KEY1`]).
    k1: u64,
    /// Expiry, in ticks (wrapping).
    expires: u32,
    peer: u32,
    port: u16,
    port2: u16,
    /// Service index, low half.
    svc_lo: u16,
    backend: u16,
}

/// The key's bits of `Entry::k1`.
const KEY1: u64 = (1 << 40) - 1;
/// `Entry::k1`: the protocol's bits (zero: a free entry).
const PROTO_BITS: u64 = 0xff << 32;
/// `Entry::k1`: where the state and flags byte starts.
const SF_SHIFT: u32 = 40;
/// `Entry::k1`: the state's bits.
const STATE_BITS: u64 = 7 << SF_SHIFT;
/// `Entry::k1`: the entry's MAC is kept in the side array.
const HAS_MAC: u64 = 1 << 63;
/// `Entry::k1`: the service index's high bits.
const SVC_HI: u64 = 0x7fff << 48;

const _: () = assert!(core::mem::size_of::<Entry>() == 32, "a conntrack entry is 32 bytes");
// A bucket is whole cache lines (4 of them), so buckets of a table that
// starts on a line never straddle one more line than they need.
const _: () = assert!((WAYS * core::mem::size_of::<Entry>()).is_multiple_of(64), "a bucket is whole cache lines");

// SAFETY: integers only: the all-zero entry is `FREE`.
#[allow(unsafe_code)]
unsafe impl super::hugemem::Zeroable for Entry {}

/// A MAC in the side array.
#[derive(Debug, Clone, Copy)]
struct Mac([u8; 6]);

// SAFETY: a byte array: all zero is a valid (the empty) MAC.
#[allow(unsafe_code)]
unsafe impl super::hugemem::Zeroable for Mac {}

const FREE: Entry = Entry { k0: 0, k1: 0, expires: 0, peer: 0, port: 0, port2: 0, svc_lo: 0, backend: 0 };

/// The state of its number in an entry (3 bits).
#[inline(always)]
fn state_of(bits: u64) -> CtState {
    match bits & 7 {
        0 => CtState::Udp,
        1 => CtState::SynRecv,
        2 => CtState::Established,
        3 => CtState::Fin,
        5 => CtState::Unconfirmed,
        6 => CtState::Icmp,
        7 => CtState::Dns,
        _ => CtState::Close,
    }
}

impl Entry {
    /// The entry of key `p` and value `v` (but for its MAC) expiring at
    /// tick `expires`.
    #[inline(always)]
    fn new(p: &Probe, v: &CtValue, expires: u32) -> Entry {
        Entry { k0: p.k0, k1: p.k1() | Entry::value_bits(v), expires, ..Entry::value_words(v) }
    }

    /// The bits of `k1` a value sets (state, flags, `HAS_MAC`, service).
    #[inline(always)]
    fn value_bits(v: &CtValue) -> u64 {
        let mac = if v.mac != [0; 6] { HAS_MAC } else { 0 };
        ((u64::from(v.state as u8) | u64::from((v.flags & FLAG_MASK) << 3)) << SF_SHIFT)
            | mac
            | ((u64::from(v.service >> 16) << 48) & SVC_HI)
    }

    /// The value's words outside `k1`.
    #[inline(always)]
    fn value_words(v: &CtValue) -> Entry {
        Entry {
            peer: v.peer,
            port: v.port,
            port2: v.port2,
            svc_lo: v.service as u16,
            backend: v.backend as u16,
            ..FREE
        }
    }

    #[inline(always)]
    fn is_free(&self) -> bool {
        self.k1 & PROTO_BITS == 0
    }

    #[inline(always)]
    fn matches(&self, p: &Probe) -> bool {
        self.k0 == p.k0 && self.k1 & KEY1 == p.k1()
    }

    /// The state's number (an index into `Conntrack::timeouts`).
    #[inline(always)]
    fn state_index(&self) -> usize {
        ((self.k1 >> SF_SHIFT) & 7) as usize
    }

    #[inline(always)]
    fn set_state(&mut self, s: CtState) {
        self.k1 = (self.k1 & !STATE_BITS) | (u64::from(s as u8) << SF_SHIFT);
    }

    /// The value, but for its MAC (see `Conntrack::value_at`).
    #[inline(always)]
    fn value(&self) -> CtValue {
        let sf = (self.k1 >> SF_SHIFT) as u8;
        CtValue {
            service: ((((self.k1 & SVC_HI) >> 48) as u32) << 16) | u32::from(self.svc_lo),
            backend: u32::from(self.backend),
            peer: self.peer,
            port: self.port,
            port2: self.port2,
            mac: [0; 6],
            state: state_of(u64::from(sf)),
            flags: (sf >> 3) & FLAG_MASK,
        }
    }

    #[inline(always)]
    fn key(&self) -> FlowKey {
        Probe { k0: self.k0, ports: self.k1 as u32, proto: (self.k1 >> 32) as u8, at: 0 }.key()
    }

    /// True if the entry is live at tick `now` (`max`: the table's longest
    /// timeout and `BACKWARD_SLACK`, so that an entry whose expiry lies
    /// further ahead than that is one that wrapped round: expired).
    #[inline(always)]
    fn live(&self, now: u32, max: u32) -> bool {
        self.expires.wrapping_sub(now).wrapping_sub(1) < max
    }
}

/// Timeouts (nanoseconds) and limits. Defaults are IPVS's. Timeouts are
/// kept to a resolution of 2^20 ns and at most about 13 days: an entry
/// lives at least its timeout after its last packet and at most about 3 ms
/// longer.
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
    /// TCP picked up without SYN, until a reply confirms it (5 s).
    pub tcp_unconfirmed: u64,
    /// UDP (IPVS: 300 s).
    pub udp: u64,
    /// ICMP query (echo) mappings (RFC 5508 REQ-1: at least 60 s).
    pub icmp: u64,
    /// UDP queries to the node's DNS server (10 s: as Kubernetes'
    /// NodeLocal DNSCache keeps DNS out of long UDP tracking).
    pub dns: u64,
    /// Flood guard: new connections per second per worker; 0 for no
    /// limit. Pickups of unconfirmed connections may use a quarter of it.
    pub max_new_per_sec: u32,
    /// Hash seed (random per process by default; tests that need the same
    /// buckets every run set one).
    pub seed: u64,
}

/// The flood guard's default rate: new connections per second per worker
/// (worker 0 owns the connection state, so per node). Far above what a
/// node's backends accept (a busy nginx: tens of thousands a second),
/// far below what fills the table: a flood of spoofed segments at the
/// pickup share (a quarter) keeps at most about 2 x 12 500 x 5 s = 125 000
/// unconfirmed entries, an eighth of the default table.
pub const DEFAULT_MAX_NEW_PER_SEC: u32 = 50_000;

/// A random 64-bit seed from the OS's random source (`getrandom`); if that
/// fails (no such source: never on Linux), one from the clock and the
/// process id, so the table still works.
pub fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        hash2(t, u64::from(std::process::id()), 0x7365_6564) as u64 | (t << 32)
    })
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig {
            capacity: 1 << 20,
            tcp_established: 900 * SECOND,
            tcp_fin: 120 * SECOND,
            tcp_syn: 60 * SECOND,
            tcp_close: 10 * SECOND,
            tcp_unconfirmed: 5 * SECOND,
            udp: 300 * SECOND,
            icmp: 60 * SECOND,
            dns: 10 * SECOND,
            max_new_per_sec: DEFAULT_MAX_NEW_PER_SEC,
            seed: random_seed(),
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
            CtState::Unconfirmed => self.tcp_unconfirmed,
            CtState::Icmp => self.icmp,
            CtState::Dns => self.dns,
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
    /// Unconfirmed entries inserted (TCP picked up without SYN).
    pub unconfirmed: u64,
    /// Unconfirmed entries confirmed by a reply.
    pub confirmed: u64,
    /// Unconfirmed entries not inserted: their bucket held only live
    /// confirmed entries.
    pub no_room: u64,
}

/// What [`Conntrack::insert_probe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Into a free or expired way (the expired entry's value, if any, so
    /// the caller can release what it held).
    Fresh(Option<CtValue>),
    /// By evicting a live entry (its value).
    Evicted(CtValue),
    /// In place of a live entry of the same key (its value): a key is
    /// never tracked twice (a lookup finds the first of a bucket's
    /// matches, and would keep finding the old one).
    Replaced(CtValue),
    /// Not inserted: the flood guard is on.
    Guarded,
    /// Not inserted: an unconfirmed entry whose bucket holds only live
    /// confirmed entries (it never evicts one).
    NoRoom,
}

/// A worker's connection table.
#[derive(Debug, Clone)]
pub struct Conntrack {
    /// In huge pages where the kernel gives them (see `hugemem`); starts
    /// on a 2 MiB boundary, so every bucket starts on a cache line.
    entries: super::hugemem::HugeArray<Entry>,
    /// The MACs of entries marked `HAS_MAC`, by entry index.
    macs: super::hugemem::HugeArray<Mac>,
    buckets: u64,
    cfg: CtConfig,
    /// `cfg`'s timeouts in ticks (plus one), by `CtState as usize` (one
    /// load on a hit; a 3-bit index needs no bounds check).
    timeouts: [u32; 8],
    /// The longest of them, plus `BACKWARD_SLACK`: an expiry further
    /// ahead than this is one that wrapped round (expired).
    max_timeout: u32,
    len: usize,
    /// Flood guard window: its start, the inserts in it, and of those the
    /// unconfirmed ones.
    window: (u64, u32, u32),
    sweep_at: usize,
    /// Counters.
    pub stats: CtStats,
}

impl Conntrack {
    /// A table of `cfg.capacity` entries (rounded up to whole buckets).
    pub fn new(cfg: CtConfig) -> Conntrack {
        let buckets = cfg.capacity.div_ceil(WAYS).max(1);
        // One tick more than the timeout: the insert's own tick is
        // truncated, so an entry lives at least its timeout (and at most
        // two ticks longer).
        // Indexed by a state's number in an entry (0-6; 7 as Close).
        let timeouts = [0u64, 1, 2, 3, 4, 5, 6, 7].map(|n| {
            let t = cfg.timeout(state_of(n)).div_ceil(1 << TICK_SHIFT).clamp(1, u64::from(MAX_TIMEOUT_TICKS));
            t as u32 + 1
        });
        Conntrack {
            entries: super::hugemem::HugeArray::zeroed(buckets * WAYS),
            macs: super::hugemem::HugeArray::zeroed(buckets * WAYS),
            buckets: buckets as u64,
            max_timeout: timeouts.iter().copied().max().unwrap_or(1) + BACKWARD_SLACK,
            timeouts,
            cfg,
            len: 0,
            window: (0, 0, 0),
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

    /// The packed key and bucket of `key` (chosen by its whole 5-tuple,
    /// [`Bucket::Tuple`]): what a lookup needs, computed once (the burst
    /// loop makes its probes with [`Conntrack::probe_in`] when it
    /// prefetches the buckets, and hands them to the lookups, which then
    /// neither pack nor hash the keys again).
    #[inline(always)]
    pub fn probe(&self, key: &FlowKey) -> Probe {
        self.probe_in(key, Bucket::Tuple)
    }

    /// [`Conntrack::probe`] of `key` in the bucket `by` chooses. An entry
    /// is found only through a probe made the way its insert's was.
    #[inline(always)]
    pub fn probe_in(&self, key: &FlowKey, by: Bucket) -> Probe {
        let k0 = (u64::from(key.src) << 32) | u64::from(key.dst);
        let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
        let proto = u64::from(key.proto);
        let (a, b) = match by {
            Bucket::Tuple => (k0, (u64::from(ports) << 8) | proto),
            Bucket::Src => (u64::from(key.src), (u64::from(key.sport) << 8) | proto),
            Bucket::Dst => (u64::from(key.dst), (u64::from(key.dport) << 8) | proto),
        };
        let h = hash2(self.cfg.seed, a, b);
        let at = (((u64::from(h) * self.buckets) >> 32) as usize) * WAYS;
        Probe { k0, ports, proto: key.proto, at }
    }

    /// Prefetches a probe's bucket (a hint: nothing observable changes),
    /// so that a lookup or insert a few frames later finds it in cache: the
    /// burst loop calls it ahead of the frame, as VPP's bihash prefetches a
    /// bucket a stage before its lookup.
    #[inline(always)]
    pub fn prefetch_probe(&self, p: &Probe) {
        let p = self.entries.as_ptr().wrapping_add(p.at).cast::<u8>();
        // The bucket's 8 entries are 256 bytes: 4 whole cache lines.
        const BYTES: usize = WAYS * core::mem::size_of::<Entry>();
        for off in (0..BYTES).step_by(64) {
            crate::wire::prefetch(p.wrapping_add(off));
        }
    }

    /// Frees the entry at index `i`: its value (with its MAC), if it was in
    /// use. The caller counts why.
    fn take(&mut self, i: usize) -> Option<CtValue> {
        let e = *self.entries.get(i)?;
        if e.is_free() {
            return None;
        }
        let v = self.value_at(i, &e);
        if let Some(x) = self.entries.get_mut(i) {
            *x = FREE;
        }
        self.len -= 1;
        Some(v)
    }

    /// Writes `e` at index `i`, and `mac` to the side array if `e` is
    /// marked as having one.
    #[inline(always)]
    fn put(&mut self, i: usize, e: Entry, mac: [u8; 6]) {
        if let Some(x) = self.entries.get_mut(i) {
            *x = e;
        }
        if e.k1 & HAS_MAC != 0
            && let Some(m) = self.macs.get_mut(i)
        {
            *m = Mac(mac);
        }
    }

    /// The value of the entry at index `i` (with its MAC from the side
    /// array if it has one).
    #[inline(always)]
    fn value_at(&self, i: usize, e: &Entry) -> CtValue {
        self.mac_of(i, e, e.value())
    }

    /// `v`, the value of entry `e` (which is or was at index `i`), with
    /// the MAC from the side array if `e` has one.
    #[inline(always)]
    fn mac_of(&self, i: usize, e: &Entry, mut v: CtValue) -> CtValue {
        if e.k1 & HAS_MAC != 0
            && let Some(m) = self.macs.get(i)
        {
            v.mac = m.0;
        }
        v
    }

    /// The live entry of the key `p` was made from (by this table's
    /// [`Conntrack::probe_in`] or [`Probe::reply_from`]) at time `now`,
    /// refreshed: its state follows `tcp_flags` (TCP only; pass 0 for UDP)
    /// and its timeout restarts. `Err(Some(value))` when the entry had
    /// expired (it is freed; the caller releases what it held), `Err(None)`
    /// when there was none.
    #[inline(always)]
    pub fn lookup_probe(&mut self, p: &Probe, now: u64, tcp_flags: u8) -> Result<CtValue, Option<CtValue>> {
        self.lookup_in::<false>(p, now, tcp_flags).map(|(v, _)| v)
    }

    /// [`Conntrack::lookup_probe`] of a reply-direction packet (from the
    /// backend): an unconfirmed entry is confirmed by it, unless it is a
    /// reset (what a backend answers a segment of a connection it does not
    /// have), and takes the state of an established connection that saw
    /// it. Also true if this confirmed the entry: the caller then confirms
    /// the connection's other entry ([`Conntrack::confirm_probe`]).
    #[inline(always)]
    pub fn lookup_reply_probe(
        &mut self,
        p: &Probe,
        now: u64,
        tcp_flags: u8,
    ) -> Result<(CtValue, bool), Option<CtValue>> {
        self.lookup_in::<true>(p, now, tcp_flags)
    }

    /// The lookup of either direction (`REPLY`: a reply's, which may
    /// confirm).
    #[inline(always)]
    fn lookup_in<const REPLY: bool>(
        &mut self,
        p: &Probe,
        now: u64,
        tcp_flags: u8,
    ) -> Result<(CtValue, bool), Option<CtValue>> {
        let (t, max) = (tick(now), self.max_timeout);
        let Some(set) = self.entries.get_mut(p.at..p.at + WAYS) else { return Err(None) };
        for (w, e) in set.iter_mut().enumerate() {
            if !e.matches(p) {
                continue;
            }
            if !e.live(t, max) {
                self.stats.expired += 1;
                return Err(self.take(p.at + w));
            }
            // An established TCP connection stays so without SYN, FIN or
            // RST (what `next_state` says, decided in one test).
            use tcp_flags::{FIN, RST, SYN};
            let mut confirmed = false;
            if p.proto == 6
                && (e.k1 & STATE_BITS != (CtState::Established as u64) << SF_SHIFT
                    || tcp_flags & (SYN | FIN | RST) != 0)
            {
                let s = state_of(e.k1 >> SF_SHIFT);
                let next = if REPLY && s == CtState::Unconfirmed && tcp_flags & RST == 0 {
                    confirmed = true;
                    next_state(CtState::Established, tcp_flags)
                } else {
                    next_state(s, tcp_flags)
                };
                e.set_state(next);
            }
            e.expires = t.wrapping_add(self.timeouts[e.state_index()]);
            let (e, v) = (*e, e.value());
            if confirmed {
                self.stats.confirmed += 1;
            }
            return Ok((self.mac_of(p.at + w, &e, v), confirmed));
        }
        Err(None)
    }

    /// Confirms the probed key's live entry if it is unconfirmed: it takes
    /// `state` (the state its connection's reply entry took, confirmed by
    /// [`Conntrack::lookup_reply_probe`]) and that state's timeout from
    /// `now`. True if it did.
    pub fn confirm_probe(&mut self, p: &Probe, state: CtState, now: u64) -> bool {
        let (t, max) = (tick(now), self.max_timeout);
        let Some(i) = self.find(p) else { return false };
        let timeout = self.timeouts[state as usize & 7];
        match self.entries.get_mut(i) {
            Some(e) if e.live(t, max) && e.state_index() == CtState::Unconfirmed as usize => {
                e.set_state(state);
                e.expires = t.wrapping_add(timeout);
                true
            }
            _ => false,
        }
    }

    /// Closes the probed key's live TCP entry: a reset its connection's
    /// other half saw ends this half too (one connection, one state, as in
    /// the kernel's conntrack). It takes [`CtState::Close`] and that
    /// state's timeout from `now`. An unconfirmed entry is left as it is
    /// (only a reply confirms it, and a reset is none). True if it did.
    pub fn close_probe(&mut self, p: &Probe, now: u64) -> bool {
        let (t, max) = (tick(now), self.max_timeout);
        let Some(i) = self.find(p) else { return false };
        let timeout = self.timeouts[CtState::Close as usize];
        let open = [CtState::SynRecv, CtState::Established, CtState::Fin].map(|s| s as usize);
        match self.entries.get_mut(i) {
            Some(e) if p.proto == 6 && e.live(t, max) && open.contains(&e.state_index()) => {
                e.set_state(CtState::Close);
                e.expires = t.wrapping_add(timeout);
                true
            }
            _ => false,
        }
    }

    /// The value of the probed key's live entry, if it has one (nothing is
    /// refreshed).
    pub fn peek_probe(&self, p: &Probe, now: u64) -> Option<CtValue> {
        let i = self.find(p)?;
        let e = self.entries.get(i)?;
        e.live(tick(now), self.max_timeout).then(|| self.value_at(i, e))
    }

    /// Inserts the key `p` was made from (by this table's
    /// [`Conntrack::probe_in`] or [`Probe::reply_from`]) → `v` at time
    /// `now` (the caller has looked it up and found nothing). Takes the
    /// first free or expired way of the key's bucket, else evicts the way
    /// seen longest ago; `guarded`, above the flood-guard rate it inserts
    /// nothing (a connection's second entry, its reply direction, goes in
    /// unguarded once the guard admitted the first, so that a connection is
    /// tracked in both directions or not at all). `v.backend` must fit 16
    /// bits (tables allow at most 65535 backends a service) and `v.flags` 4
    /// ([`FLAG_MASK`]).
    #[inline(always)]
    pub fn insert_probe(&mut self, p: &Probe, v: CtValue, now: u64, guarded: bool) -> Inserted {
        self.insert_keeping(p, v, now, guarded, usize::MAX).0
    }

    /// [`Conntrack::insert_probe`] that leaves the entry at index `keep`
    /// alone if it is in the probe's bucket (the other half of a
    /// connection, just inserted there: in a bucket of entries all seen
    /// this tick it would be as old as any other; `usize::MAX` for none).
    /// Also the key of the entry it displaced (the caller's own key if it
    /// displaced none) and the new entry's index.
    #[inline(always)]
    pub(crate) fn insert_keeping(
        &mut self,
        p: &Probe,
        v: CtValue,
        now: u64,
        guarded: bool,
        keep: usize,
    ) -> (Inserted, FlowKey, usize) {
        let pickup = v.state == CtState::Unconfirmed;
        if guarded && self.cfg.max_new_per_sec > 0 {
            let max = self.cfg.max_new_per_sec;
            if now.saturating_sub(self.window.0) >= SECOND {
                self.window = (now, 0, 0);
            }
            if self.window.1 >= max || (pickup && self.window.2 >= max.div_ceil(4)) {
                self.stats.guarded += 1;
                return (Inserted::Guarded, p.key(), usize::MAX);
            }
            self.window.1 += 1;
            self.window.2 += u32::from(pickup);
        }
        debug_assert!(
            v.backend <= u32::from(u16::MAX) && v.service <= MAX_SERVICE && v.flags & !FLAG_MASK == 0,
            "{v:?} fits an entry"
        );
        let (t, max) = (tick(now), self.max_timeout);
        let entry = Entry::new(p, &v, t.wrapping_add(self.timeouts[v.state as usize & 7]));
        let Some(set) = self.entries.get(p.at..p.at + WAYS) else { return (Inserted::NoRoom, p.key(), usize::MAX) };
        // The way to keep, if it is in this bucket (else WAYS: none).
        let keep = if keep == usize::MAX { WAYS } else { keep.wrapping_sub(p.at).min(WAYS) };
        // The first way that is free or expired, else an unconfirmed one,
        // else the one seen longest ago (its expiry less its state's
        // timeout is when it was last seen; the first of those): one pass,
        // stopping at the first usable way. The rank is the age, plus 2^32
        // for an unconfirmed entry.
        const UNCONFIRMED: u64 = 1 << 32;
        let (mut victim, mut rank, mut fresh) = (usize::MAX, 0u64, false);
        // An entry of the same key (live or not) is the one replaced.
        let same = set.iter().enumerate().position(|(i, e)| i != keep && !e.is_free() && e.matches(p));
        if let Some(w) = same {
            (victim, fresh) = (w, true);
        } else {
            for (i, e) in set.iter().enumerate() {
                if i == keep {
                    continue;
                }
                if e.is_free() || !e.live(t, max) {
                    (victim, fresh) = (i, true);
                    break;
                }
                let s = e.state_index();
                let age = t.wrapping_sub(e.expires.wrapping_sub(self.timeouts[s]));
                let r = u64::from(age) | if s == CtState::Unconfirmed as usize { UNCONFIRMED } else { 0 };
                if victim == usize::MAX || r > rank {
                    (victim, rank) = (i, r);
                }
            }
        }
        if pickup && !fresh && rank < UNCONFIRMED {
            // Only confirmed entries to evict: an unconfirmed entry never
            // takes the place of one.
            self.stats.no_room += 1;
            return (Inserted::NoRoom, p.key(), usize::MAX);
        }
        self.stats.inserted += 1;
        self.stats.unconfirmed += u64::from(pickup);
        // (A bucket has more than one way: some way other than `keep`.)
        let victim = victim.min(WAYS - 1);
        let at = p.at + victim;
        let old = set[victim];
        let was = (!old.is_free()).then(|| self.value_at(at, &old));
        let old_key = if old.is_free() { p.key() } else { old.key() };
        let replaced = same.is_some() && old.live(t, max);
        self.put(at, entry, v.mac);
        let r = match (fresh, was) {
            (true, None) => {
                self.len += 1;
                Inserted::Fresh(None)
            }
            (true, Some(old)) if replaced => Inserted::Replaced(old),
            (true, Some(old)) => {
                self.stats.expired += 1;
                Inserted::Fresh(Some(old))
            }
            (false, old) => {
                self.stats.evicted += 1;
                Inserted::Evicted(old.unwrap_or(CtValue::ZERO))
            }
        };
        (r, old_key, at)
    }

    /// Evicts the probed key's live entry, if any (the other half of a
    /// connection whose entry an insert evicted, so that no connection is
    /// left tracked in one direction only); its value. Counted as evicted.
    pub(crate) fn evict_probe(&mut self, p: &Probe, now: u64) -> Option<CtValue> {
        let i = self.find(p)?;
        if !self.entries.get(i)?.live(tick(now), self.max_timeout) {
            return None;
        }
        let v = self.take(i)?;
        self.stats.evicted += 1;
        Some(v)
    }

    /// The index of the probed key's entry, live or not.
    fn find(&self, p: &Probe) -> Option<usize> {
        let set = self.entries.get(p.at..p.at + WAYS)?;
        set.iter().position(|e| e.matches(p)).map(|w| p.at + w)
    }

    /// True if the probed key has a live entry at `now` (nothing is
    /// refreshed).
    pub fn contains_probe(&self, p: &Probe, now: u64) -> bool {
        self.find(p).and_then(|i| self.entries.get(i)).is_some_and(|e| e.live(tick(now), self.max_timeout))
    }

    /// Removes the probed key's entry; its value if there was one.
    pub fn remove_probe(&mut self, p: &Probe) -> Option<CtValue> {
        let v = self.take(self.find(p)?)?;
        self.stats.removed += 1;
        Some(v)
    }

    /// Frees expired entries among the next `budget` entries (round robin
    /// over the table), calling `released` with each freed value. A worker
    /// calls it between bursts so that idle flows release their backends
    /// (connection counts, drained backends) without a timer per entry, and
    /// so that no expired entry stays unvisited long enough for its 32-bit
    /// expiry to wrap round.
    pub fn sweep(&mut self, now: u64, budget: usize, mut released: impl FnMut(&FlowKey, CtValue)) {
        let n = self.entries.len();
        let (t, max) = (tick(now), self.max_timeout);
        for _ in 0..budget.min(n) {
            let i = self.sweep_at;
            self.sweep_at = if i + 1 == n { 0 } else { i + 1 };
            if let Some(e) = self.entries.get(i).copied()
                && !e.live(t, max)
                && let Some(v) = self.take(i)
            {
                released(&e.key(), v);
                self.stats.expired += 1;
            }
        }
    }

    /// Every live entry: its key, value and expiry time (diagnostics:
    /// `meshplane conntrack ls`; the expiry to the table's resolution).
    pub fn entries(&self, now: u64) -> impl Iterator<Item = (FlowKey, CtValue, u64)> + '_ {
        let (t, max) = (tick(now), self.max_timeout);
        self.entries.iter().enumerate().filter(move |(_, e)| !e.is_free() && e.live(t, max)).map(move |(i, e)| {
            let left = u64::from(e.expires.wrapping_sub(t)) << TICK_SHIFT;
            (e.key(), self.value_at(i, e), now + left)
        })
    }

    /// Every live entry's value (diagnostics, tests, draining checks).
    pub fn values(&self, now: u64) -> impl Iterator<Item = CtValue> + '_ {
        self.entries(now).map(|(_, v, _)| v)
    }
}

/// The TCP state after a segment with `flags`.
#[inline]
pub fn next_state(s: CtState, flags: u8) -> CtState {
    use tcp_flags::*;
    if matches!(s, CtState::Udp | CtState::Icmp | CtState::Dns) {
        // Datagrams and queries have no flags to follow.
        s
    } else if s == CtState::Unconfirmed {
        // Only a reply confirms it (`Conntrack::lookup_reply_probe`): no
        // segment from the side that may be spoofing moves it to a state
        // that lives longer, but a SYN, which opens the connection anew
        // (as a SYN to an empty table would).
        if flags & (SYN | ACK | RST) == SYN { CtState::SynRecv } else { s }
    } else if flags & RST != 0 {
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

    /// The table by 5-tuple (in [`Bucket::Tuple`]), for these tests.
    trait ByKey {
        fn lookup(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Option<CtValue>;
        fn lookup_or_expired(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Result<CtValue, Option<CtValue>>;
        fn insert(&mut self, key: &FlowKey, v: CtValue, now: u64) -> Inserted;
        fn contains(&self, key: &FlowKey, now: u64) -> bool;
        fn remove(&mut self, key: &FlowKey) -> Option<CtValue>;
    }

    impl ByKey for Conntrack {
        fn lookup(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Option<CtValue> {
            self.lookup_or_expired(key, now, tcp_flags).ok()
        }
        fn lookup_or_expired(&mut self, key: &FlowKey, now: u64, tcp_flags: u8) -> Result<CtValue, Option<CtValue>> {
            self.lookup_probe(&self.probe(key), now, tcp_flags)
        }
        fn insert(&mut self, key: &FlowKey, v: CtValue, now: u64) -> Inserted {
            self.insert_probe(&self.probe(key), v, now, true)
        }
        fn contains(&self, key: &FlowKey, now: u64) -> bool {
            self.contains_probe(&self.probe(key), now)
        }
        fn remove(&mut self, key: &FlowKey) -> Option<CtValue> {
            self.remove_probe(&self.probe(key))
        }
    }

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

    /// A small table with the fixed seed the tests were written for (the
    /// default is random: with it, a test that fills a table could see a
    /// bucket overflow one run in many).
    fn small(capacity: usize) -> Conntrack {
        Conntrack::new(CtConfig { capacity, seed: 0x636f_6e6e_7472_6163, ..CtConfig::default() })
    }

    #[test]
    fn five_flag_bits_a_mac_and_31_bit_services_round_trip() {
        let mut ct = small(64);
        for (i, (flags, service, mac)) in
            [(FLAG_MASK, MAX_SERVICE, [2, 0, 0, 0, 0, 9]), (0x10, 1 << 30, [0; 6]), (0x0f, 0x7fff_0000, [1; 6])]
                .into_iter()
                .enumerate()
        {
            let v = CtValue { service, flags, mac, state: CtState::Icmp, peer: 7, port: 8, port2: 9, backend: 3 };
            ct.insert(&key(i as u32), v, 0);
            assert_eq!(ct.lookup(&key(i as u32), 1, 0), Some(v), "{v:?}");
        }
    }

    #[test]
    fn an_icmp_mapping_lives_its_own_timeout() {
        let cfg = CtConfig { capacity: 64, icmp: 60 * SECOND, udp: 300 * SECOND, ..CtConfig::default() };
        let mut ct = Conntrack::new(cfg);
        ct.insert(&key(1), CtValue { state: CtState::Icmp, ..CtValue::ZERO }, 0);
        assert_eq!(ct.lookup(&key(1), 59 * SECOND, SYN | ACK).map(|v| v.state), Some(CtState::Icmp), "no TCP moves");
        assert!(ct.contains(&key(1), 118 * SECOND));
        assert!(!ct.contains(&key(1), 120 * SECOND), "60 s after the last packet");
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
        // An entry outlives its timeout by at most two ticks.
        const LATE: u64 = 2 << TICK_SHIFT;
        let cfg = CtConfig::default();
        let mut ct = Conntrack::new(CtConfig { capacity: 64, ..cfg });
        // SYN only: gone after 60 s.
        ct.insert(&key(1), val(0, CtState::SynRecv), 0);
        assert!(ct.lookup(&key(1), 60 * SECOND - 1, 0).is_some());
        assert_eq!(ct.lookup_or_expired(&key(1), 120 * SECOND + LATE, 0), Err(Some(val(0, CtState::SynRecv))));
        assert_eq!(ct.len(), 0);
        // Established: 900 s after the last packet, refreshed by each.
        ct.insert(&key(2), val(0, CtState::SynRecv), 0);
        ct.lookup(&key(2), 1, ACK);
        assert!(ct.lookup(&key(2), 1 + 899 * SECOND, ACK).is_some());
        assert!(ct.lookup(&key(2), 1 + 899 * SECOND + 900 * SECOND - 1, ACK).is_some());
        assert_eq!(ct.lookup(&key(2), 1 + 899 * SECOND + 1800 * SECOND + LATE, ACK), None);
        // FIN: 120 s; RST: 10 s.
        ct.insert(&key(3), val(0, CtState::Established), 0);
        assert_eq!(ct.lookup(&key(3), 0, FIN | ACK).map(|v| v.state), Some(CtState::Fin));
        assert!(ct.lookup(&key(3), 119 * SECOND, 0).is_some());
        assert_eq!(ct.lookup(&key(3), 119 * SECOND + 120 * SECOND + LATE, 0), None);
        ct.insert(&key(4), val(0, CtState::Established), 0);
        assert_eq!(ct.lookup(&key(4), 0, RST).map(|v| v.state), Some(CtState::Close));
        assert_eq!(ct.lookup(&key(4), 10 * SECOND + LATE, 0), None);
        // UDP: 300 s.
        let udp = FlowKey { proto: 17, ..key(5) };
        ct.insert(&udp, val(0, CtState::Udp), 0);
        assert!(ct.lookup(&udp, 299 * SECOND, 0).is_some());
        assert_eq!(ct.lookup(&udp, 299 * SECOND + 300 * SECOND + LATE, 0), None);
        // Configurable, to the table's resolution: at least the timeout,
        // at most two ticks more.
        let mut short = Conntrack::new(CtConfig { capacity: 64, udp: 5 * SECOND, ..cfg });
        short.insert(&udp, val(0, CtState::Udp), 0);
        assert!(short.lookup(&udp, 5 * SECOND - 1, 0).is_some());
        short.insert(&FlowKey { sport: 1, ..udp }, val(0, CtState::Udp), 0);
        assert_eq!(short.lookup(&FlowKey { sport: 1, ..udp }, 5 * SECOND + LATE, 0), None);
    }

    #[test]
    fn values_round_trip_through_the_packed_entry() {
        let mut ct = small(64);
        let v = CtValue {
            service: 0x0012_3456,
            backend: 65535,
            peer: 0xc612_0001,
            port: 8080,
            port2: 30080,
            mac: [2, 0, 0, 0, 9, 9],
            state: CtState::Established,
            flags: FLAG_MASK,
        };
        ct.insert(&key(1), v, 0);
        assert_eq!(ct.lookup(&key(1), 1, ACK), Some(v));
        // Without a MAC nothing is read from the side array, and a MAC an
        // earlier entry of the same way left there does not show.
        assert_eq!(ct.remove(&key(1)), Some(v));
        let w = CtValue { mac: [0; 6], flags: 1, ..v };
        ct.insert(&key(1), w, 0);
        assert_eq!(ct.lookup(&key(1), 1, ACK), Some(w));
        assert_eq!(ct.entries(1).map(|(k, v, _)| (k, v)).collect::<Vec<_>>(), [(key(1), w)]);
        // A value written again keeps its key.
        ct.remove(&key(1));
        ct.insert(&key(1), CtValue { backend: 7, mac: [2, 0, 0, 0, 7, 7], ..w }, 1);
        assert_eq!(ct.lookup(&key(1), 2, ACK), Some(CtValue { backend: 7, mac: [2, 0, 0, 0, 7, 7], ..w }));
    }

    #[test]
    fn both_directions_of_a_connection_share_a_bucket() {
        let mut ct = small(1 << 12);
        let fwd = key(7);
        let reply = FlowKey { src: 0xc613_0002, dst: fwd.src, sport: 8080, dport: fwd.sport, proto: 6 };
        let (f, r) = (ct.probe_in(&fwd, Bucket::Src), ct.probe_in(&reply, Bucket::Dst));
        assert_eq!(f.at, r.at);
        assert_eq!(f.reply_from(reply.src, reply.sport), r);
        assert_eq!((f.key(), r.key()), (fwd, reply));
        // Whole tuples spread: of 64 replies to one address and port from
        // different backends, most land in different buckets.
        let buckets: std::collections::HashSet<usize> = (0..64)
            .map(|i| {
                ct.probe(&FlowKey { src: 0xc613_0000 + i, dst: 0xc613_00fe, sport: 8080, dport: 40000, proto: 6 }).at
            })
            .collect();
        assert!(buckets.len() > 50, "{}", buckets.len());
        // An entry is found only the way it was put in.
        ct.insert_probe(&r, val(1, CtState::SynRecv), 0, false);
        assert!(ct.contains_probe(&r, 1));
        assert!(!ct.contains(&reply, 1) || ct.probe(&reply).at == r.at);
        assert_eq!(ct.remove_probe(&r).map(|v| v.backend), Some(1));
        assert!(!ct.contains_probe(&r, 1));
    }

    #[test]
    fn an_insert_leaves_the_way_it_is_told_to_keep() {
        // One bucket, every way live and seen in this same tick: the
        // forward entry evicts the first way; the reply, told to keep that
        // way, evicts the next one rather than the forward entry.
        let mut ct = small(WAYS);
        for i in 0..WAYS as u32 {
            ct.insert(&key(i), val(i, CtState::Established), 5);
        }
        let (f, r) = (ct.probe(&key(100)), ct.probe(&key(101)));
        let (got, old, at) = ct.insert_keeping(&f, val(100, CtState::SynRecv), 6, true, usize::MAX);
        assert_eq!((got, old), (Inserted::Evicted(val(0, CtState::Established)), key(0)));
        let (got, old, at2) = ct.insert_keeping(&r, val(101, CtState::SynRecv), 6, false, at);
        assert_eq!((got, old), (Inserted::Evicted(val(1, CtState::Established)), key(1)));
        assert_ne!(at, at2);
        assert!(ct.contains(&key(100), 7) && ct.contains(&key(101), 7));
        // Evicting the other half of a connection: live entries only.
        assert_eq!(ct.evict_probe(&ct.probe(&key(2)), 7).map(|v| v.backend), Some(2));
        assert_eq!(ct.evict_probe(&ct.probe(&key(2)), 7), None);
        assert_eq!((ct.len(), ct.stats.evicted), (WAYS - 1, 3));
    }

    #[test]
    fn an_expired_entry_keeps_its_mac() {
        let mut ct = small(64);
        let v = CtValue { mac: [2, 0, 0, 0, 1, 2], ..val(1, CtState::Udp) };
        let udp = FlowKey { proto: 17, ..key(1) };
        ct.insert(&udp, v, 0);
        assert_eq!(ct.lookup_or_expired(&udp, 1000 * SECOND, 0), Err(Some(v)));
    }

    #[test]
    fn expiry_survives_the_tick_counter_wrapping() {
        // The 32-bit tick counter wraps every 2^32 ticks (about 52 days).
        const T: u64 = 1 << TICK_SHIFT;
        let mut ct = small(64);
        let start = ((1u64 << 32) - 10) * T;
        let udp = FlowKey { proto: 17, ..key(1) };
        ct.insert(&udp, val(0, CtState::Udp), start);
        assert!(ct.lookup(&udp, start + 299 * SECOND, 0).is_some(), "live across the wrap");
        assert!(ct.contains(&udp, start + 299 * SECOND + 299 * SECOND));
        assert!(!ct.contains(&udp, start + 299 * SECOND + 301 * SECOND), "expired across the wrap");
        // An entry left unvisited for half the counter's range (far beyond
        // any timeout) is expired, not live again.
        ct.insert(&key(2), val(0, CtState::Established), 0);
        assert!(!ct.contains(&key(2), (1u64 << 31) * T));
        // (Only in the last hours before the counter comes round to it
        // again would it look live: the sweep frees it long before.)
        assert_eq!(ct.lookup_or_expired(&key(2), (3u64 << 30) * T, ACK), Err(Some(val(0, CtState::Established))));
        // A caller may ask about a time before the last packet's.
        ct.insert(&key(3), val(0, CtState::Established), 1000 * SECOND);
        assert!(ct.contains(&key(3), 10 * SECOND));
    }

    #[test]
    fn timeouts_are_cut_to_the_longest_the_table_keeps() {
        let day = 86_400 * SECOND;
        let mut ct = Conntrack::new(CtConfig { capacity: 64, tcp_established: 365 * day, ..CtConfig::default() });
        ct.insert(&key(1), val(0, CtState::Established), 0);
        assert!(ct.contains(&key(1), 12 * day));
        assert!(!ct.contains(&key(1), 14 * day));
    }

    #[test]
    fn full_bucket_evicts_the_least_recently_seen() {
        // One bucket: WAYS entries fill it; the next evicts the oldest.
        // (Times in ticks, the table's resolution.)
        const T: u64 = 1 << TICK_SHIFT;
        let mut ct = small(WAYS);
        for i in 0..WAYS as u32 {
            assert_eq!(
                ct.insert(&key(i), val(i, CtState::Established), (u64::from(i) + 10) * T),
                Inserted::Fresh(None)
            );
        }
        // Touch flow 0 so that flow 1 is now the oldest.
        ct.lookup(&key(0), 100 * T, ACK);
        assert_eq!(
            ct.insert(&key(99), val(99, CtState::SynRecv), 101 * T),
            Inserted::Evicted(val(1, CtState::Established))
        );
        assert_eq!(ct.lookup(&key(1), 102 * T, ACK), None);
        assert!(ct.lookup(&key(0), 102 * T, ACK).is_some());
        assert_eq!((ct.len(), ct.stats.evicted), (WAYS, 1));
        // An expired way is reused before a live one is evicted (every
        // entry has expired by then).
        let late = 100 * T + 1000 * SECOND;
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
    fn a_key_is_never_tracked_twice_an_insert_replaces_its_live_entry() {
        let mut ct = small(64);
        assert_eq!(ct.insert(&key(1), val(1, CtState::Close), 0), Inserted::Fresh(None));
        assert_eq!(ct.insert(&key(1), val(2, CtState::SynRecv), SECOND), Inserted::Replaced(val(1, CtState::Close)));
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.lookup(&key(1), SECOND, 0), Some(val(2, CtState::SynRecv)));
        // Expired, it is taken as any expired entry is.
        assert!(matches!(ct.insert(&key(1), val(3, CtState::SynRecv), 100 * SECOND), Inserted::Fresh(Some(_))));
        assert_eq!((ct.len(), ct.lookup(&key(1), 100 * SECOND, 0)), (1, Some(val(3, CtState::SynRecv))));
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
        ct.sweep(301 * SECOND, ct.capacity() / 2, |_, v| released.push(v.backend));
        ct.sweep(301 * SECOND, ct.capacity() / 2, |_, v| released.push(v.backend));
        released.sort_unstable();
        assert_eq!(released, (0..50).collect::<Vec<_>>());
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.values(301 * SECOND).map(|v| v.backend).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn an_unconfirmed_entry_expires_within_seconds_whatever_the_client_sends() {
        const LATE: u64 = 2 << TICK_SHIFT;
        let mut ct = small(64);
        assert_eq!(ct.insert(&key(1), val(0, CtState::Unconfirmed), 0), Inserted::Fresh(None));
        assert_eq!(ct.stats.unconfirmed, 1);
        // Segments from the client side (ACK, FIN, RST) keep it unconfirmed,
        // with its short timeout.
        for (t, f) in [(SECOND, ACK), (2 * SECOND, FIN | ACK), (3 * SECOND, RST)] {
            assert_eq!(ct.lookup(&key(1), t, f).map(|v| v.state), Some(CtState::Unconfirmed));
        }
        assert!(ct.contains(&key(1), 3 * SECOND + 5 * SECOND - 1));
        assert!(!ct.contains(&key(1), 3 * SECOND + 5 * SECOND + LATE), "gone 5 s after its last segment");
        // A SYN opens it anew.
        ct.insert(&key(2), val(0, CtState::Unconfirmed), 0);
        assert_eq!(ct.lookup(&key(2), 1, SYN).map(|v| v.state), Some(CtState::SynRecv));
    }

    #[test]
    fn a_reply_confirms_an_unconfirmed_entry_but_a_reset_does_not() {
        let mut ct = small(64);
        let (fwd, reply) = (key(1), key(2));
        ct.insert(&fwd, val(0, CtState::Unconfirmed), 0);
        ct.insert(&reply, val(0, CtState::Unconfirmed), 0);
        let rp = ct.probe(&reply);
        // The backend's reset: still unconfirmed, nothing to confirm.
        assert_eq!(ct.lookup_reply_probe(&rp, SECOND, RST | ACK), Ok((val(0, CtState::Unconfirmed), false)));
        // Its ACK: established, and the caller confirms the forward entry.
        assert_eq!(ct.lookup_reply_probe(&rp, 2 * SECOND, ACK), Ok((val(0, CtState::Established), true)));
        assert_eq!(ct.stats.confirmed, 1);
        assert!(ct.confirm_probe(&ct.probe(&fwd), CtState::Established, 2 * SECOND));
        assert!(!ct.confirm_probe(&ct.probe(&fwd), CtState::Established, 2 * SECOND), "once");
        // Both now live as established connections do.
        for k in [fwd, reply] {
            assert!(ct.contains(&k, 2 * SECOND + 899 * SECOND), "{k:?}");
        }
        assert_eq!(ct.lookup(&fwd, 3 * SECOND, ACK).map(|v| v.state), Some(CtState::Established));
        // A forward lookup never confirms.
        ct.insert(&key(3), val(0, CtState::Unconfirmed), 0);
        assert_eq!(ct.lookup(&key(3), 1, ACK).map(|v| v.state), Some(CtState::Unconfirmed));
    }

    #[test]
    fn unconfirmed_entries_are_evicted_first_and_never_evict_confirmed_ones() {
        const T: u64 = 1 << TICK_SHIFT;
        let mut ct = small(WAYS);
        // Four old confirmed connections, four newer unconfirmed ones.
        for i in 0..4u32 {
            ct.insert(&key(i), val(i, CtState::Established), T);
        }
        for i in 4..8u32 {
            ct.insert(&key(i), val(i, CtState::Unconfirmed), (10 + u64::from(i)) * T);
        }
        // A new connection takes the oldest unconfirmed way, though every
        // confirmed entry was seen longer ago.
        assert_eq!(
            ct.insert(&key(20), val(20, CtState::SynRecv), 20 * T),
            Inserted::Evicted(val(4, CtState::Unconfirmed))
        );
        // So does a new unconfirmed one.
        assert_eq!(
            ct.insert(&key(21), val(21, CtState::Unconfirmed), 20 * T),
            Inserted::Evicted(val(5, CtState::Unconfirmed))
        );
        for i in 0..4 {
            assert!(ct.contains(&key(i), 20 * T), "confirmed {i} kept");
        }
        // A bucket of confirmed entries only: an unconfirmed one finds no
        // room (counted), a SYN still evicts the least recently seen.
        let mut full = small(WAYS);
        for i in 0..WAYS as u32 {
            full.insert(&key(i), val(i, CtState::Established), T);
        }
        assert_eq!(full.insert(&key(30), val(30, CtState::Unconfirmed), 2 * T), Inserted::NoRoom);
        assert_eq!((full.len(), full.stats.no_room, full.stats.evicted), (WAYS, 1, 0));
        assert!(matches!(full.insert(&key(31), val(31, CtState::SynRecv), 2 * T), Inserted::Evicted(_)));
    }

    #[test]
    fn flood_guard_gives_pickups_a_quarter_of_the_rate() {
        let cfg = CtConfig { capacity: 4096, max_new_per_sec: 100, ..CtConfig::default() };
        let mut ct = Conntrack::new(cfg);
        let (mut admitted, mut guarded) = (0, 0);
        for i in 0..100 {
            match ct.insert(&key(i), val(0, CtState::Unconfirmed), 1000 + u64::from(i)) {
                Inserted::Guarded => guarded += 1,
                _ => admitted += 1,
            }
        }
        assert_eq!((admitted, guarded, ct.stats.guarded), (25, 75, 75));
        // SYNs still have the rest of the second's budget.
        for i in 100..175 {
            assert_eq!(ct.insert(&key(i), val(0, CtState::SynRecv), 2000), Inserted::Fresh(None), "{i}");
        }
        assert_eq!(ct.insert(&key(175), val(0, CtState::SynRecv), 2000), Inserted::Guarded);
        // On by default, and 0 turns it off.
        assert_eq!(CtConfig::default().max_new_per_sec, DEFAULT_MAX_NEW_PER_SEC);
        let mut off = Conntrack::new(CtConfig { max_new_per_sec: 0, ..cfg });
        for i in 0..1000 {
            assert_ne!(off.insert(&key(i), val(0, CtState::Unconfirmed), 0), Inserted::Guarded);
        }
    }

    #[test]
    fn the_default_hash_seed_is_random_per_table() {
        let (a, b) = (CtConfig::default(), CtConfig::default());
        assert_ne!(a.seed, b.seed);
        let (ta, tb) =
            (Conntrack::new(CtConfig { capacity: 1 << 12, ..a }), Conntrack::new(CtConfig { capacity: 1 << 12, ..b }));
        let same = (0..1000).filter(|&i| ta.probe(&key(i)).at == tb.probe(&key(i)).at).count();
        assert!(same < 20, "{same} of 1000 keys in the same bucket in both tables");
        // An explicit seed gives the same buckets every time.
        let (c, d) = (Conntrack::new(CtConfig { seed: 7, ..ta.cfg }), Conntrack::new(CtConfig { seed: 7, ..tb.cfg }));
        assert!((0..1000).all(|i| c.probe(&key(i)).at == d.probe(&key(i)).at));
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
        for f in [ACK, FIN | ACK, RST, RST | ACK, SYN | ACK, 0] {
            assert_eq!(next_state(Unconfirmed, f), Unconfirmed, "flags {f:#x}");
        }
        assert_eq!(next_state(Unconfirmed, SYN), SynRecv);
    }
}
